"""extensions/llava through the webui stand-in: every image entry point, parity, placement, "embed all".

Each test drives ``script.py``'s hooks with ``WebuiHarness`` on a tiny checkpoint and checks what reached
``model.generate``: ``input_ids`` as long as ``inputs_embeds``, and both equal to what ``LlavaPipeline.prepare``
computes directly for the prompt the test expects (written out from the checkpoint family's format, with
``<image>`` where an image belongs). For llava-hf the result is also compared with transformers'
``LlavaForConditionalGeneration`` (logits and greedy tokens).
"""

from __future__ import annotations

import pytest
import torch

from webui_harness import image_part, text_part
from webui_llava_support import (  # noqa: F401 - fixtures
    visible_reply,
    ADD_BOS,
    MARKER,
    V1_SYSTEM,
    assert_generate_matches,
    hook_calls,
    image,
    instruct_prompt,
    last_call,
    last_prompt,
    loaded,
    make_harness,
    marked,
    slots_in,
)

QUESTION = "What is in this picture?"
FORMATS = ["hf", "v15"]


def _send_and_check(harness, entry, fmt, text, pictures, expected_user):
    harness.send(text, pictures)
    expected_prompt = instruct_prompt(fmt, [(expected_user, None)])
    assert marked(last_prompt(harness)) == expected_prompt
    expected = entry.prepare(expected_prompt, pictures, add_bos=ADD_BOS[fmt])
    assert_generate_matches(last_call(harness), expected)
    return expected


# ---------------------------------------------------------------------------------------------- UI entry points


@pytest.mark.parametrize("fmt", FORMATS)
def test_send_one_image(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    picture = image(70, 45)
    expected = _send_and_check(harness, loaded(fmt), fmt, QUESTION, [picture], f"<image>\n{QUESTION}")
    assert [s.length for s in expected.prompt.image_spans] == [loaded(fmt).pipeline.tokens_per_image]
    assert slots_in(last_prompt(harness)) == [(0, (70, 45))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_send_two_images_in_order(fmt, make_harness, loaded):
    harness = make_harness(fmt, {"llava-add_all_images_to_prompt": True})
    first, second = image(70, 45, seed=1), image(40, 60, seed=2)
    expected = _send_and_check(harness, loaded(fmt), fmt, "Compare them.", [first, second],
                               "<image>\n<image>\nCompare them.")
    call = last_call(harness)
    spans = expected.prompt.image_spans
    entry = loaded(fmt)
    torch.testing.assert_close(call.inputs_embeds[0, spans[0].start:spans[0].end], entry.features(first), atol=0, rtol=0)
    torch.testing.assert_close(call.inputs_embeds[0, spans[1].start:spans[1].end], entry.features(second), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_send_two_images_without_embed_all_embeds_both(fmt, make_harness, loaded):
    """"Embed all" off (the default): every image of the most recent message with images has positions."""
    harness = make_harness(fmt)
    first, second = image(70, 45, seed=1), image(40, 60, seed=2)
    harness.send("Compare them.", [first, second])
    expected_prompt = instruct_prompt(fmt, [("<image>\n<image>\nCompare them.", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert slots_in(last_prompt(harness)) == [(0, (70, 45)), (1, (40, 60))]
    assert_generate_matches(last_call(harness),
                            loaded(fmt).prepare(expected_prompt, [first, second], add_bos=ADD_BOS[fmt]))
    assert "llava:" not in visible_reply(harness)  # nothing was left out


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_only_message(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    _send_and_check(harness, loaded(fmt), fmt, "", [image(50, 50)], "<image>\n")


@pytest.mark.parametrize("fmt", FORMATS)
def test_regenerate_and_continue_keep_the_image(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    picture = image(70, 45)
    harness.send(QUESTION, [picture])
    first = last_call(harness)

    harness.regenerate()
    regenerated = last_call(harness)
    assert regenerated is not first
    assert regenerated.input_ids.tolist() == first.input_ids.tolist()
    torch.testing.assert_close(regenerated.inputs_embeds, first.inputs_embeds, atol=0, rtol=0)

    partial = harness.history["internal"][-1][1]
    harness.continue_()
    expected_prompt = instruct_prompt(fmt, [(f"<image>\n{QUESTION}", None)]) + " " + partial.strip()
    # Continue renders the partial reply as an assistant turn and cuts after its text.
    assert marked(last_prompt(harness)).startswith(expected_prompt[: expected_prompt.index("ASSISTANT:")])
    assert marked(last_prompt(harness)).endswith(partial)
    expected = loaded(fmt).prepare(marked(last_prompt(harness)), [picture], add_bos=ADD_BOS[fmt])
    assert_generate_matches(last_call(harness), expected)
    assert len(expected.prompt.image_spans) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_impersonate_keeps_the_history_images(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    picture = image(70, 45)
    harness.send(QUESTION, [picture])
    reply = harness.history["internal"][-1][1]
    harness.impersonate()
    prompt = last_prompt(harness)
    assert MARKER in prompt  # webui built this prompt itself (no custom_generate_chat_prompt)
    # webui's marker layout "<__media__>\n\n" + text; the extension puts the image where the marker is.
    expected_prompt = prompt.replace(MARKER, "<image>")
    expected = loaded(fmt).prepare(expected_prompt, [picture], add_bos=ADD_BOS[fmt])
    assert_generate_matches(last_call(harness), expected)
    assert f"<image>\n\n{QUESTION}" in expected_prompt and expected_prompt.rstrip().endswith("USER:")
    assert reply.strip() in expected_prompt


@pytest.mark.parametrize("fmt", FORMATS)
def test_remove_last_leaves_no_stale_image(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    harness.send(QUESTION, [image(70, 45)])
    assert last_call(harness).inputs_embeds is not None
    harness.remove_last()
    harness.send("Just text now.")
    call = last_call(harness)
    assert not slots_in(last_prompt(harness)) and MARKER not in last_prompt(harness)
    assert call.inputs_embeds is None  # text-only turn: webui's own ids, nothing spliced


@pytest.mark.parametrize("fmt", FORMATS)
def test_edited_message_keeps_its_image(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    picture = image(70, 45)
    harness.send(QUESTION, [picture])
    # Edit: webui replaces the row's texts and keeps its metadata (attachments included).
    harness.history["internal"][-1][0] = "Edited: what colour dominates?"
    harness.history["visible"][-1][0] = "Edited: what colour dominates?"
    harness.regenerate()
    expected_prompt = instruct_prompt(fmt, [("<image>\nEdited: what colour dominates?", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert_generate_matches(last_call(harness), loaded(fmt).prepare(expected_prompt, [picture], add_bos=ADD_BOS[fmt]))


@pytest.mark.parametrize("mode", ["chat", "chat-instruct"])
def test_chat_modes(mode, make_harness, loaded):
    harness = make_harness("v15", {"mode": mode, "context": "CTX"})
    picture = image(70, 45)
    harness.send("Look at my picture.", [picture])
    prompt = marked(last_prompt(harness))
    if mode == "chat":
        assert prompt == "CTX\n\nAI: How can I help you today?\nYou: <image>\nLook at my picture.\nAI:"
    else:
        assert prompt.startswith(V1_SYSTEM + " USER: Continue the chat dialogue below.")
        assert prompt.endswith("You: <image>\nLook at my picture.\n ASSISTANT:")
    # No BOS text in either prompt: the tokenizer's own BOS, once (tokenizer_image_token).
    expected = loaded("v15").prepare(prompt, [picture], add_bos=True)
    assert_generate_matches(last_call(harness), expected)
    assert last_call(harness).input_ids[0, 0].item() == loaded("v15").tokenizer.bos_token_id
    assert last_call(harness).input_ids[0, 1].item() != loaded("v15").tokenizer.bos_token_id


# ---------------------------------------------------------------------------------------------- API entry points


def _api_messages(picture, text=QUESTION):
    return [{"role": "user", "content": [image_part(picture), text_part(text)]}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_api_chat_completions(fmt, stream, make_harness, loaded):
    harness = make_harness(fmt)
    picture = image(70, 45)
    reply = harness.api_chat(_api_messages(picture), stream=stream)
    expected_prompt = instruct_prompt(fmt, [(f"<image>\n{QUESTION}", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert_generate_matches(last_call(harness), loaded(fmt).prepare(expected_prompt, [picture], add_bos=ADD_BOS[fmt]))
    assert isinstance(reply, str)
    if not stream:  # webui deep-copies state for tokenizer_modifier in non-streaming chat
        tokenizer_state = hook_calls(harness, "tokenizer_modifier")[-1].args[0]
        output_state = hook_calls(harness, "output_modifier")[-1].args[1]
        assert tokenizer_state is not output_state


@pytest.mark.parametrize("fmt", FORMATS)
def test_api_chat_history_images_stay_with_their_messages(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    harness.params["add_all_images_to_prompt"] = True
    first, second = image(70, 45, seed=1), image(45, 70, seed=2)
    messages = [
        {"role": "user", "content": [image_part(first), text_part("Describe picture one.")]},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": [text_part("And picture two?"), image_part(second)]},
    ]
    harness.api_chat(messages)
    expected_prompt = instruct_prompt(fmt, [("<image>\nDescribe picture one.", "It is red."),
                                            ("<image>\nAnd picture two?", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert_generate_matches(last_call(harness),
                            loaded(fmt).prepare(expected_prompt, [first, second], add_bos=ADD_BOS[fmt]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_api_completions_with_messages_uses_raw_images(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    picture = image(70, 45)
    text = "USER: what is this?\nASSISTANT:"
    harness.api_completions(messages=[{"role": "user", "content": [text_part(text), image_part(picture)]}])
    assert last_prompt(harness) == text  # webui's prompt: the text parts, no marker
    # No <image> in the prompt: the image goes first.
    expected = loaded(fmt).prepare("<image>" + text, [picture], add_bos=True)
    assert_generate_matches(last_call(harness), expected)


@pytest.mark.parametrize("embed_all", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_api_completions_follow_the_multi_image_rule(fmt, embed_all, make_harness, loaded):
    """/v1/completions with several image messages: without "embed all" only the images of the most recent
    message with images are used (a typed <image> of an earlier image stays empty), with it every image."""
    harness = make_harness(fmt, {"llava-add_all_images_to_prompt": embed_all})
    first, second, third = image(70, 45, seed=1), image(45, 70, seed=2), image(50, 50, seed=3)
    messages = [
        {"role": "user", "content": [text_part("USER: <image> first?"), image_part(first)]},
        {"role": "assistant", "content": " ASSISTANT: red.\n"},
        {"role": "user", "content": [text_part("USER: <image> and <image>?\nASSISTANT:"), image_part(second),
                                     image_part(third)]},
    ]
    harness.api_completions(messages=messages)
    prompt = "USER: <image> first? ASSISTANT: red.\nUSER: <image> and <image>?\nASSISTANT:"
    assert last_prompt(harness) == prompt
    if embed_all:
        expected = loaded(fmt).prepare(prompt, [first, second, third], add_bos=True)
    else:
        expected = loaded(fmt).prepare(prompt.replace("<image>", "", 1), [second, third], add_bos=True)
    assert_generate_matches(last_call(harness), expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_api_completions_prompt_with_image_marker(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    picture = image(70, 45)
    prompt = "USER: <image>\nwhat is this?\nASSISTANT:"
    harness.api_completions(prompt=prompt, messages=[{"role": "user", "content": [image_part(picture)]}])
    expected = loaded(fmt).prepare(prompt, [picture], add_bos=True)
    assert_generate_matches(last_call(harness), expected)

    # The same prompt without images: <image> stays text and nothing is spliced.
    harness.api_completions(prompt=prompt)
    call = last_call(harness)
    assert call.inputs_embeds is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_chat_prompt_endpoint_and_count_tokens_count_image_positions(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    entry = loaded(fmt)
    picture = image(56, 56)
    start = len(harness.hook_calls)
    prompt = harness.api_chat_prompt(_api_messages(picture))
    assert prompt == instruct_prompt(fmt, [(f"{MARKER}\n\n{QUESTION}", None)])
    (count_call,) = hook_calls(harness, "custom_tokenized_length", start)
    assert count_call.args[0] == prompt
    # Counted as the extension will place the image: "<image>\n" before the text.
    assert count_call.result == entry.length(prompt.replace(MARKER + "\n\n", "<image>\n"), [picture],
                                             add_bos=ADD_BOS[fmt])

    plain = harness.count_tokens(QUESTION)
    with_image = harness.count_tokens(QUESTION, [picture])
    counted_prompt = hook_calls(harness, "custom_tokenized_length")[-1].args[0]
    assert with_image == entry.length(counted_prompt.replace(MARKER + "\n\n", "<image>\n"), [picture],
                                      add_bos=ADD_BOS[fmt])
    assert with_image - plain >= entry.pipeline.tokens_per_image


# ---------------------------------------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoints):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_checkpoints.hf), dtype=torch.float32).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(str(tiny_checkpoints.hf)),
        tokenizer=AutoTokenizer.from_pretrained(str(tiny_checkpoints.hf)),
        patch_size=tiny_checkpoints.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


@pytest.mark.parametrize("entry_point", ["ui", "api", "api_stream"])
def test_hf_matches_llava_for_conditional_generation(entry_point, make_harness, loaded, hf_reference, tiny_checkpoints):
    reference, processor = hf_reference
    harness = make_harness("hf", {"max_new_tokens": 6, "custom_stopping_strings": ""})
    picture = image(70, 45)
    if entry_point == "ui":
        harness.send(QUESTION, [picture])
    else:
        harness.api_chat(_api_messages(picture), stream=entry_point == "api_stream", max_tokens=6)
    call = last_call(harness)
    prompt = marked(last_prompt(harness))
    assert prompt == f"USER: <image>\n{QUESTION} ASSISTANT:"

    inputs = processor(images=[picture], text=prompt, return_tensors="pt")
    assert call.input_ids.tolist() == inputs["input_ids"].tolist()
    model = loaded("hf").model
    with torch.no_grad():
        ours = model(inputs_embeds=call.inputs_embeds).logits[0]
        theirs = reference(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0]
        expected_tokens = reference.generate(
            input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
            attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=6, do_sample=False, pad_token_id=0,
        )[0, inputs["input_ids"].shape[1]:].tolist()
    # Inside webui the ids past the tokenizer (llava-hf pads its vocabulary) are masked; every real id's
    # logit is the reference's.
    real = len(processor.tokenizer)
    assert ours.shape[1] > real
    torch.testing.assert_close(ours[:, :real], theirs[:, :real], atol=1e-5, rtol=0)
    assert torch.isneginf(ours[:, real:]).all()
    # Greedy tokens: webui's generate ran to max_new_tokens (no stop string or EOS in 6 random tokens).
    assert call.output is not None and call.error is None
    assert call.output[0, call.input_ids.shape[1]:].tolist() == expected_tokens
    assert len(set(expected_tokens)) > 1


# ---------------------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("fmt", ["hf", "v15", "v0"])
def test_typed_image_marker_places_images_in_order(fmt, make_harness, loaded):
    harness = make_harness(fmt, {"llava-add_all_images_to_prompt": True})
    first, second = image(70, 45, seed=1), image(40, 60, seed=2)
    marker_user = "Left <image> and right <image>: which is brighter?"
    harness.send(marker_user, [first, second])
    expected_prompt = instruct_prompt(fmt, [(marker_user, None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert slots_in(last_prompt(harness)) == [(0, (70, 45)), (1, (40, 60))]
    assert_generate_matches(last_call(harness),
                            loaded(fmt).prepare(expected_prompt, [first, second], add_bos=ADD_BOS[fmt]))


@pytest.mark.parametrize("fmt", ["hf", "v0"])
def test_typed_image_marker_of_an_image_without_positions_takes_nothing(fmt, make_harness, loaded):
    """"Embed all" off: once a later message brings an image, the earlier message's images have no
    positions; their typed <image> markers are not given to any other image."""
    harness = make_harness(fmt)
    first, second, third = image(70, 45, seed=1), image(40, 60, seed=2), image(50, 50, seed=3)
    harness.send("Left <image> and right <image>: which is brighter?", [first, second])
    expected_prompt = instruct_prompt(fmt, [("Left <image> and right <image>: which is brighter?", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert_generate_matches(last_call(harness),
                            loaded(fmt).prepare(expected_prompt, [first, second], add_bos=ADD_BOS[fmt]))
    reply = "The right one."  # a random model may say nothing, and webui leaves an empty reply out
    harness.history["internal"][-1][1] = harness.history["visible"][-1][1] = reply

    harness.send("And <image> this one?", [third])
    expected_prompt = instruct_prompt(fmt, [("Left  and right : which is brighter?", reply),
                                            ("And <image> this one?", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert_generate_matches(last_call(harness), loaded(fmt).prepare(expected_prompt, [third], add_bos=ADD_BOS[fmt]))
    assert "image1.png, image2.png (from an earlier message) are not shown to the model" in visible_reply(harness)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fewer_typed_markers_than_images_keep_the_order_sent(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    first, second = image(70, 45, seed=1), image(40, 60, seed=2)
    harness.send("Only <image> here, then more.", [first, second])
    placed = {"v0": "Only <image> here, then more.\n<image>"}.get(fmt, "<image>\nOnly <image> here, then more.")
    expected_prompt = instruct_prompt(fmt, [(placed, None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert [size for _, size in slots_in(last_prompt(harness))] == [(70, 45), (40, 60)]
    assert_generate_matches(last_call(harness),
                            loaded(fmt).prepare(expected_prompt, [first, second], add_bos=ADD_BOS[fmt]))


@pytest.mark.parametrize("fmt, setting, expected_user", [
    ("hf", "auto", f"<image>\n{QUESTION}"),
    ("v15", "auto", f"<image>\n{QUESTION}"),
    ("v0", "auto", f"{QUESTION}\n<image>"),
    ("hf", "after", f"{QUESTION}\n<image>"),
    ("v15", "after", f"{QUESTION}\n<image>"),
    ("v0", "before", f"<image>\n{QUESTION}"),
])
def test_default_placement_and_override(fmt, setting, expected_user, make_harness, loaded):
    harness = make_harness(fmt, {"llava-image_placement": setting})
    picture = image(70, 45)
    _send_and_check(harness, loaded(fmt), fmt, QUESTION, [picture], expected_user)


def test_v0_uses_im_start_end_around_its_patches(make_harness, loaded, tiny_checkpoints):
    harness = make_harness("v0")
    harness.send(QUESTION, [image(70, 45)])
    ids = last_call(harness).input_ids[0].tolist()
    n = tiny_checkpoints.tokens_per_image
    start = ids.index(tiny_checkpoints.im_start_id)
    assert ids[start + 1:start + 1 + n] == [tiny_checkpoints.im_patch_id] * n
    assert ids[start + 1 + n] == tiny_checkpoints.im_end_id


# ---------------------------------------------------------------------------------------------- "embed all images"


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed_all_unchecked_embeds_only_the_latest_image(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    assert harness.params["add_all_images_to_prompt"] is False
    entry = loaded(fmt)
    first, second = image(70, 45, seed=1), image(45, 70, seed=2)
    harness.send("Describe picture one.", [first])
    reply = harness.history["internal"][-1][1].strip()
    harness.send("And picture two?", [second])
    expected_prompt = instruct_prompt(fmt, [("Describe picture one.", reply), ("<image>\nAnd picture two?", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    expected = entry.prepare(expected_prompt, [second], add_bos=ADD_BOS[fmt])
    assert_generate_matches(last_call(harness), expected)
    # The earlier image takes no positions at all: one image span, and the prompt with both is longer.
    assert len(expected.prompt.image_spans) == 1
    both = instruct_prompt(fmt, [("<image>\nDescribe picture one.", reply), ("<image>\nAnd picture two?", None)])
    assert entry.length(both, [first, second], add_bos=ADD_BOS[fmt]) - last_call(harness).input_ids.shape[1] \
        >= entry.pipeline.tokens_per_image

    # A text-only turn after that still shows the most recent image.
    harness.send("Which one was brighter?")
    assert len(slots_in(last_prompt(harness))) == 1
    assert last_call(harness).input_ids.shape[1] > len(entry.tokenizer(marked(last_prompt(harness)))["input_ids"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed_all_checked_embeds_every_image(fmt, make_harness, loaded):
    harness = make_harness(fmt, {"llava-add_all_images_to_prompt": True})
    first, second = image(70, 45, seed=1), image(45, 70, seed=2)
    harness.send("Describe picture one.", [first])
    reply = harness.history["internal"][-1][1].strip()
    harness.send("And picture two?", [second])
    expected_prompt = instruct_prompt(fmt, [("<image>\nDescribe picture one.", reply), ("<image>\nAnd picture two?", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert_generate_matches(last_call(harness), loaded(fmt).prepare(expected_prompt, [first, second], add_bos=ADD_BOS[fmt]))


def test_embed_all_checkbox_applies_to_the_next_request(make_harness, loaded):
    """The checkbox writes params (global, like webui's extension params); the next request follows it."""
    harness = make_harness("hf")
    first, second = image(70, 45, seed=1), image(45, 70, seed=2)
    harness.send("one", [first])
    harness.send("two", [second])
    assert len(slots_in(last_prompt(harness))) == 1
    harness.params["add_all_images_to_prompt"] = True
    harness.regenerate()
    assert [index for index, _ in slots_in(last_prompt(harness))] == [0, 1]


def test_past_image_only_message_keeps_its_image_when_embedding_all(make_harness, loaded):
    """webui leaves past rows with empty text out of the prompt; with a slot written in, the row stays."""
    harness = make_harness("hf", {"llava-add_all_images_to_prompt": True})
    first, second = image(70, 45, seed=1), image(45, 70, seed=2)
    harness.send("", [first])
    reply = harness.history["internal"][-1][1].strip()
    harness.send("And this one?", [second])
    expected_prompt = instruct_prompt("hf", [("<image>\n", reply), ("<image>\nAnd this one?", None)])
    assert marked(last_prompt(harness)) == expected_prompt
    assert_generate_matches(last_call(harness), loaded("hf").prepare(expected_prompt, [first, second], add_bos=True))


# ---------------------------------------------------------------------------------------------- install locations


@pytest.mark.parametrize("load_as", ["package", "user_data"])
def test_both_install_locations_work(load_as, make_harness, loaded, tmp_path):
    harness = make_harness("hf", load_as=load_as, user_data_dir=tmp_path / "user_data")
    expected_name = "extensions.llava.script" if load_as == "package" else "user_ext_llava"
    assert harness.extension.__name__ == expected_name
    assert harness.extension._vision.pipeline is not None
    _send_and_check(harness, loaded("hf"), "hf", QUESTION, [image(70, 45)], f"<image>\n{QUESTION}")


def test_a_new_image_is_decoded_once_and_a_cached_one_never(make_harness, loaded, monkeypatch):
    from llava_pipeline import LlavaPipeline

    harness = make_harness("hf")
    decoded = []
    original = LlavaPipeline.load_image

    def counting_load_image(self, source, *args, **kwargs):
        decoded.append(kwargs.get("name"))
        return original(self, source, *args, **kwargs)

    monkeypatch.setattr(LlavaPipeline, "load_image", counting_load_image)
    picture = image(73, 41, seed=4242)  # no other test sends it: neither its size nor embedding is known
    harness.send(QUESTION, [picture])
    assert len(decoded) == 1  # the prompt hook's check decodes it; the splice reuses that picture
    decoded.clear()
    harness.send("And what colour is it?")
    assert decoded == []  # size and embedding are cached: the re-sent image is not decoded
    assert len(slots_in(last_prompt(harness))) == 1
