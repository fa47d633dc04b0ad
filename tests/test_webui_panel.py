"""What the LLaVA panel says (issue 13, item 5): pending pictures before a message is sent, what the last
message carried after it. The Gradio wiring is checked in a real browser (tests/integration) and, with the
events fired as the browser fires them, through tests/fake_gradio.py; the other tests here are the handlers
it calls, with the values webui's Gradio hands them (``{"text", "files": [paths]}``)."""

from __future__ import annotations

from webui_llava_support import image, loaded, make_harness  # noqa: F401 - fixtures


def saved(tmp_path, name, picture=None, raw=None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        picture.save(path)
    return str(path)


def test_pending_then_sent(make_harness, tmp_path):
    harness = make_harness("hf")
    script = harness.extension
    tokens = harness.extension._vision.current().prompt_positions((96, 64))
    first = saved(tmp_path, "first.png", image(96, 64, seed=1))
    second = saved(tmp_path, "second.jpg", image(64, 96, seed=2))

    assert script._pending_info({"text": "", "files": []}) == "No image waiting for the next message."
    box, pending = script._attach_to_textbox([first], {"text": "Compare", "files": []})
    assert box == {"text": "Compare", "files": [first]}
    assert pending == f"**Next message** (not sent yet):\n\n* first.png: 96×64, {tokens} tokens of context"
    box, pending = script._attach_to_textbox([second], box)  # a second picture, e.g. from the paperclip
    assert box["files"] == [first, second]
    assert pending.splitlines()[-1].startswith("* second.jpg: 64×96, ")

    # webui copies the box into "Chat input" and empties the box when the message is sent.
    assert script._pending_info({"text": "", "files": []}) == "No image waiting for the next message."
    sent = script._sent_info(box, False)
    assert sent.startswith("**Sent** with your last message:") and "first.png: 96×64" in sent and "second.jpg" in sent
    assert "not sent yet" not in sent

    follow_up = {"text": "And now?", "files": []}
    assert script._sent_info(follow_up, False) == ("**Sent**: your last message had no image; the model still "
                                                   "sees the images of your most recent message that had any.")
    assert script._sent_info(follow_up, True).endswith("the model still sees every image of the chat.")
    assert script._sent_info(None, False) == ""


def test_broken_and_other_files(make_harness, tmp_path):
    script = make_harness("hf").extension
    broken = saved(tmp_path, "broken.png", raw=b"\x89PNG\r\n\x1a\nnot really")
    notes = saved(tmp_path, "notes.txt", raw=b"text attachment")
    _, pending = script._attach_to_textbox([broken, notes], None)
    lines = pending.splitlines()
    assert len(lines) == 3  # the title, a blank line, one picture: webui sends the .txt as text
    assert lines[-1].startswith("* ⚠️ broken.png: cannot decode image") and "not be shown to the model" in lines[-1]


def test_a_model_that_cannot_see_images_is_said_so(make_harness, tmp_path, monkeypatch):
    script = make_harness("hf").extension
    monkeypatch.setattr(script._vision, "current", lambda: None)
    picture = saved(tmp_path, "cat.png", image(20, 20))
    assert script._pending_info({"files": [picture]}).endswith("* cat.png (vision inactive: the model will not see it)")


def test_the_panel_wiring_follows_the_chat(make_harness, tmp_path, monkeypatch):
    """The panel's events, fired as the browser fires them (tests/fake_gradio.py): what is pending and
    what was sent stay true through a send, a dummy message, Remove last, the checkbox and a new chat."""
    import sys

    import fake_gradio
    from fake_gradio import by_id, fire
    from modules import shared

    harness = make_harness("hf")
    gr = fake_gradio.module()
    monkeypatch.setitem(sys.modules, "gradio", gr)
    box = gr.MultimodalTextbox(value={"text": "", "files": []})
    webui = {"textbox": box, "Chat input": gr.State(), "Send dummy message": gr.Button(),
             "Send dummy reply": gr.Button(), "Remove last": gr.Button(), "Start new chat": gr.Button(),
             "unique_id": gr.Radio()}
    monkeypatch.setattr(shared, "gradio", dict(webui))
    harness.extension.ui()
    upload, pending, sent, embed_all = (by_id(name) for name in ("llava-image", "llava-pending", "llava-sent",
                                                                 "llava-embed-all"))
    first = saved(tmp_path, "first.png", image(96, 64, seed=1))
    nothing = "No image waiting for the next message."

    def send_message(text):  # webui: the box into "Chat input", then the box emptied
        webui["Chat input"].value = {**box.value, "text": text}
        box.value = {"text": "", "files": []}
        fire(webui["Chat input"], "change")
        fire(box, "change")

    upload.value = [first]
    fire(upload, "upload")
    assert box.value["files"] == [first] and "first.png: 96×64" in pending.value
    send_message("Look.")
    assert pending.value == nothing and "first.png: 96×64" in sent.value

    upload.value = [first]
    fire(upload, "upload")
    fire(webui["Send dummy message"], "click")  # read before webui empties the box, which fires no change
    box.value = {"text": "", "files": []}
    assert pending.value == nothing and sent.value.startswith("**Sent** with your last message:")

    fire(webui["Remove last"], "click")
    assert sent.value == "" and pending.value == nothing
    embed_all.value = True
    fire(embed_all, "change")
    assert sent.value == ""

    send_message("And now?")
    assert sent.value.endswith("the model still sees every image of the chat.")
    for name, event in (("Start new chat", "click"), ("unique_id", "select")):
        send_message("Again?")
        assert sent.value
        fire(webui[name], event)
        assert sent.value == "", name
