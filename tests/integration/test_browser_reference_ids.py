"""Opt-in: through the chat page of a real webui (headless Chromium), the ids that reach the model equal the
reference's, as over the API (test_webui_reference_ids.py).

An original-format checkpoint (v0: ``model_type: llama``, so webui's own ``--model`` load at startup reads it
and the page opens with the extension's template) gets two pictures through the paperclip in one message,
then a text follow-up in instruct mode, then a picture in chat mode. The test-only capture extension of
test_webui_reference_ids.py records what the ``tokenizer_modifier`` chain hands to ``model.generate``;
the reference is original LLaVA's ``get_prompt`` + the v0 tokenization (tests/reference_support.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import real_webui
from client_host import ui_host
from test_browser import open_chat_page, wait_for_text
from test_webui_reference_ids import _marked, _ours, link_llava_and_capture

sync_api = pytest.importorskip("playwright.sync_api")

MODEL = "tiny-v0-legacy-false"
REPLY_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def ui_server(tiny_checkpoints, tmp_path_factory):
    import reference_support

    host = ui_host()
    root = tmp_path_factory.mktemp("webui-ui-ids")
    user_data = real_webui.make_user_data_dir(host, root / "user_data", settings={
        "max_new_tokens": 4, "auto_max_new_tokens": False, "do_sample": False, "temperature": 0,
        "llava-add_all_images_to_prompt": True})
    reference_support.make_variant(tiny_checkpoints.v0, user_data / "models" / MODEL, "legacy-false")
    records = link_llava_and_capture(user_data, root)
    server = real_webui.WebuiServer(host, user_data, root / "webui.log", model=MODEL,
                                    extensions=("llava", "llava_idcapture"), nowebui=False)
    server.start_and_wait()
    try:
        yield server, records, user_data / "models" / MODEL
    finally:
        server.stop()
    assert "Traceback (most recent call last)" not in server.log_text(), server.log_tail()


@pytest.fixture(scope="module")
def page(ui_server):
    with open_chat_page(ui_server[0].ui_port) as opened:
        yield opened


def _send(page, records: Path, text: str, files=()) -> dict:
    """Attach ``files`` with the paperclip, type ``text``, press Send; the capture record of that turn."""
    before = records.read_text().count("\n") if records.exists() else 0
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(path) for path in files])
        time.sleep(1.0)  # the upload reaches Gradio's cache before the message is sent
    page.locator("#chat-input textarea").fill(text)
    page.locator("#Generate").click()
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not records.exists() or records.read_text().count("\n") == before:
        assert time.monotonic() < deadline, "no generation was captured"
        time.sleep(0.2)
    wait_for_text(page, "#chat", lambda chat: text in chat)
    time.sleep(1.0)  # let the reply finish streaming before the next action
    return json.loads(records.read_text().splitlines()[-1])


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_chat_page_reaches_the_model_as_the_reference(ui_server, page, tmp_path):
    import original_llava
    import reference_support
    from tiny_llava import make_test_image

    server, records, folder = ui_server
    page, problems = page
    tokenizer = _tokenizer(folder)
    rows = reference_support.tokens_per_image(folder)
    pictures = [tmp_path / "first.png", tmp_path / "second.png", tmp_path / "third.png"]
    for number, (path, size) in enumerate(zip(pictures, [(96, 64), (64, 96), (80, 80)]), start=1):
        make_test_image(*size, seed=number).save(path)

    # Instruct mode (webui's default), two pictures in one message: the original v0 conversation.
    record = _send(page, records, "Compare these.", pictures[:2])
    prompt = original_llava.prompt_for("llava_v0", [("Compare these.", 2, None)])
    assert _marked(record["prompt"]) == prompt
    assert _ours(record) == reference_support.original_ids(tokenizer, "v0", prompt, [rows, rows])

    # A text follow-up: the reply of turn one (as webui kept it) in the original format.
    record = _send(page, records, "Which one is brighter?")
    marked = _marked(record["prompt"])
    reply = marked.split("Compare these.\n<image>\n<image>###Assistant: ", 1)[1].split("###Human: Which one", 1)[0]
    prompt = original_llava.prompt_for("llava_v0", [("Compare these.", 2, reply), ("Which one is brighter?", 0, None)])
    assert marked == prompt
    assert _ours(record) == reference_support.original_ids(tokenizer, "v0", prompt, [rows, rows])

    # Chat mode: webui's own prompt, tokenized as the original tokenizes a prompt.
    # The mode radio sits in webui's collapsed sidebar: click it as a script would.
    page.locator("#chat-mode input[value=chat]").evaluate("radio => radio.click()")
    time.sleep(2.0)
    record = _send(page, records, "And this one?", pictures[2:])
    marked = _marked(record["prompt"])
    assert "And this one?\n<image>" in marked
    assert "###Human: And this one?" not in marked  # chat mode's "You:" turns, not the instruct template's
    assert _ours(record) == reference_support.original_ids(tokenizer, "v0", marked, [rows] * marked.count("<image>"))
    assert problems == []
