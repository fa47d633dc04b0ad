"""extensions/llava and webui's context handling: exact token counts, history truncation, cut slots,
"fell out of the context" notices and the auto_max_new_tokens limit."""

from __future__ import annotations

import logging

import pytest
import torch

from webui_llava_support import (  # noqa: F401 - fixtures
    ADD_BOS,
    MARKER,
    NOTICE_PREFIX,
    assert_generate_matches,
    hook_calls,
    image,
    instruct_prompt,
    last_call,
    last_prompt,
    loaded,
    make_harness,
    marked,
    png,
    slots_in,
    visible_reply,
)

from modules import shared  # noqa: E402



def _chat_of_three(harness, pictures):
    for number, picture in enumerate(pictures):
        harness.send(f"Tell me about picture number {number}, please.", [(f"picture{number}.png", png(picture))])


@pytest.mark.parametrize("fmt", ["hf", "v15", "v0"])
@pytest.mark.parametrize("mode", ["instruct", "chat"])
def test_custom_tokenized_length_equals_the_final_input_length(fmt, mode, make_harness):
    harness = make_harness(fmt, {"mode": mode, "llava-add_all_images_to_prompt": True})
    harness.send("First picture.", [image(70, 45, seed=1)])
    harness.send("Second and third.", [image(40, 60, seed=2), image(56, 56, seed=3)])
    prompt = last_prompt(harness)
    assert len(slots_in(prompt)) == 3
    assert harness.extension.custom_tokenized_length(prompt) == last_call(harness).input_ids.shape[1]
    # The counts webui's truncation loop got during prompt building used the same rule.
    counted = [call for call in hook_calls(harness, "custom_tokenized_length") if call.args[0] == prompt]
    assert counted and all(call.result == last_call(harness).input_ids.shape[1] for call in counted)


@pytest.mark.parametrize("fmt, stream", [("hf", True), ("v15", True), ("hf", False)])
def test_history_truncation_drops_whole_messages_and_keeps_images_aligned(fmt, stream, make_harness, loaded, caplog):
    """stream False: webui hands tokenizer_modifier a deep copy of the UI state; the notice must still show."""
    entry = loaded(fmt)
    harness = make_harness(fmt, {"llava-add_all_images_to_prompt": True, "stream": stream})
    pictures = [image(70, 45, seed=1), image(40, 60, seed=2), image(56, 56, seed=3)]
    _chat_of_three(harness, pictures[:2])
    two_image_length = last_call(harness).input_ids.shape[1]
    # Room for about two images and their text, not three.
    shared.settings["truncation_length"] = two_image_length + shared.settings["max_new_tokens"]
    with caplog.at_level(logging.INFO, logger="textgen"):
        harness.send("Tell me about picture number 2, please.", [("picture2.png", png(pictures[2]))])
    prompt = last_prompt(harness)
    call = last_call(harness)
    assert call.input_ids.shape[1] <= two_image_length
    surviving = [index for index, _ in slots_in(prompt)]
    assert surviving and surviving[-1] == 2 and 0 not in surviving
    assert surviving == sorted(surviving)
    # Every surviving slot carries its own image: the same tensors as that image encoded on its own.
    expected = entry.prepare(marked(prompt), [pictures[i] for i in surviving], add_bos=ADD_BOS[fmt])
    assert_generate_matches(call, expected)
    for span, index in zip(expected.prompt.image_spans, surviving):
        torch.testing.assert_close(call.inputs_embeds[0, span.start:span.end], entry.features(pictures[index]),
                                   atol=0, rtol=0)
    # Dropped images are reported above the reply and in the log.
    assert visible_reply(harness).startswith(NOTICE_PREFIX)
    assert "picture0.png" in visible_reply(harness)
    assert any("picture0.png" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)
    # Nothing of the history was changed by the extension.
    assert [a["name"] for a in harness.history["metadata"]["user_0"]["attachments"]] == ["picture0.png"]


@pytest.mark.parametrize("fmt, placement", [("hf", "before"), ("v0", "after")])
def test_a_cut_slot_is_no_image_and_leaves_no_residue(fmt, placement, make_harness, loaded, caplog):
    harness = make_harness(fmt)
    entry = loaded(fmt)
    text = "describe every detail of this picture " * 6
    # Budget: the template and a short prefix of the message fit, the image's positions never do.
    empty_prompt = instruct_prompt(fmt, [("", None)])
    budget = entry.length(empty_prompt, [], add_bos=ADD_BOS[fmt]) + 8
    assert budget < entry.pipeline.tokens_per_image + entry.length(empty_prompt, [], add_bos=ADD_BOS[fmt])
    shared.settings["truncation_length"] = budget + shared.settings["max_new_tokens"]
    with caplog.at_level(logging.WARNING, logger="textgen"):
        harness.send(text, [("cut.png", png(image(70, 45)))])
    prompt = last_prompt(harness)
    assert not slots_in(prompt)
    call = last_call(harness)
    assert call.input_ids.shape[1] <= budget
    # No image rows, and no leftover of the slot ("0:70x45" digits) reached the model as text.
    decoded = entry.tokenizer.decode(call.input_ids[0], skip_special_tokens=True)
    assert "70x45" not in decoded and ":70x" not in decoded and "\ue000" not in decoded
    if call.inputs_embeds is not None:
        text_embeds = entry.embed(call.input_ids)
        torch.testing.assert_close(call.inputs_embeds, text_embeds, atol=0, rtol=0)
    assert "cut.png" in visible_reply(harness) and visible_reply(harness).startswith(NOTICE_PREFIX)
    assert "User message truncated" in caplog.text


def test_sliced_webui_marker_never_takes_an_image(make_harness, loaded):
    """A prompt webui built itself (impersonate) whose older marker was sliced: only intact markers get images,
    each its own row's image."""
    harness = make_harness("hf", {"llava-add_all_images_to_prompt": True})
    entry = loaded("hf")
    first, second = image(70, 45, seed=1), image(40, 60, seed=2)
    harness.send("first picture", [first])
    harness.send("second picture", [second])
    ext = harness.extension
    state = harness.ui_state()
    rows = harness.history["internal"]
    prompt = (f"USER: {MARKER[:-1]}\n\n{rows[0][0]} ASSISTANT: {rows[0][1]} "
              f"USER: {MARKER}\n\n{rows[1][0]} ASSISTANT: {rows[1][1]} USER:")
    ids = torch.tensor([entry.tokenizer(prompt)["input_ids"]])
    _, new_ids, embeds = ext.tokenizer_modifier(state, prompt, ids, None)
    expected = entry.prepare(prompt.replace(MARKER, "<image>"), [second], add_bos=True)
    assert new_ids.tolist() == expected.input_ids.tolist()
    torch.testing.assert_close(embeds, expected.inputs_embeds, atol=0, rtol=0)


def test_impersonate_after_truncation_keeps_images_with_their_rows(make_harness, loaded):
    harness = make_harness("hf", {"llava-add_all_images_to_prompt": True})
    entry = loaded("hf")
    pictures = [image(70, 45, seed=1), image(40, 60, seed=2), image(56, 56, seed=3)]
    _chat_of_three(harness, pictures)
    full = last_call(harness).input_ids.shape[1]
    shared.settings["truncation_length"] = full - 10 + shared.settings["max_new_tokens"]
    harness.impersonate()
    prompt = last_prompt(harness)
    assert 0 < prompt.count(MARKER) < 3
    # Markers belong to the last messages; each gets its own row's picture.
    kept = pictures[3 - prompt.count(MARKER):]
    expected = entry.prepare(prompt.replace(MARKER, "<image>"), kept, add_bos=True)
    assert_generate_matches(last_call(harness), expected)


@pytest.mark.parametrize("fmt", ["hf", "v15"])
def test_auto_max_new_tokens_never_overruns_the_context(fmt, make_harness):
    truncation_length = 64
    harness = make_harness(fmt, {"auto_max_new_tokens": True, "truncation_length": truncation_length,
                                 "custom_system_message": "Be brief."})
    harness.send("Hi", [image(70, 45)])
    call = last_call(harness)
    prompt_length = call.input_ids.shape[1]
    # webui sized the reply from the text-only prompt, so on its own it would overrun the context.
    assert prompt_length + call.kwargs["max_new_tokens"] > truncation_length
    names = [type(p).__name__ for p in call.kwargs["logits_processor"]]
    assert "_ContextLimit" in names
    assert call.output is not None
    assert call.output.shape[1] <= truncation_length
    # The limit, not a natural EOS, ended this reply: the context is exactly full, ending with EOS.
    assert call.output.shape[1] == truncation_length
    assert call.output[0, -1].item() == harness.model.config.eos_token_id or \
        call.output[0, -1].item() == shared.tokenizer.eos_token_id


def test_context_limit_only_for_requests_with_images(make_harness):
    harness = make_harness("hf")
    harness.send("Hi", [image(70, 45)])
    assert "_ContextLimit" not in [type(p).__name__ for p in last_call(harness).kwargs["logits_processor"]]

    shared.settings.update(auto_max_new_tokens=True, truncation_length=96)  # a short reply budget
    harness.send("Again", [image(70, 45)])
    assert "_ContextLimit" in [type(p).__name__ for p in last_call(harness).kwargs["logits_processor"]]
    # A text-only request afterwards (new chat, same thread) does not inherit the previous request's limit.
    harness.new_chat()
    harness.send("Now text only.")
    assert last_call(harness).inputs_embeds is None
    assert "_ContextLimit" not in [type(p).__name__ for p in last_call(harness).kwargs["logits_processor"]]


@pytest.mark.parametrize("embed_all", [False, True])
def test_count_tokens_agrees_with_the_next_request(embed_all, make_harness, loaded):
    """"History + Input" counts the positions the next request will really take: with "embed all" off, only
    the newest message's images (both of them) have positions (the markers webui writes for older ones
    take none)."""
    harness = make_harness("hf", {"llava-add_all_images_to_prompt": embed_all})
    harness.send("First picture.", [image(70, 45, seed=1)])
    harness.send("Second and third.", [image(40, 60, seed=2), image(60, 40, seed=4)])
    newest = [image(56, 56, seed=3), image(30, 50, seed=5)]
    counted = harness.count_tokens("And now?", newest)
    harness.send("And now?", newest)
    actual = last_call(harness).input_ids.shape[1]
    images = len(slots_in(last_prompt(harness)))
    assert images == (5 if embed_all else 2)
    # webui's count prompt writes "<__media__>\n\n" where the request has "<slot>\n": a token per image at most.
    assert abs(counted - actual) <= images
