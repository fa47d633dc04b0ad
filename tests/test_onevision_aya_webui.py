"""LLaVA-OneVision and Aya Vision through the webui stand-in (tests/webui_stub) with the language model
loaded alone, as webui's Transformers loader does, and the checkpoint's own chat template registered by
the extension.

What reaches ``model.generate`` must be what transformers' processor and model give for the same
conversation: the prompt the checkpoint's chat template renders, the processor's input ids, logits
within 1e-5 (fp32), the same greedy tokens. Covered: the chat UI, the OpenAI API (plain and streamed),
images in two turns and two images in one message (OneVision then tiles neither: the processor's rule
for several images), webui's token counting (``custom_tokenized_length``) and the panel's token cost.
"""

from __future__ import annotations

import pytest
import torch

import tiny_aya_vision
import tiny_onevision
from parity_support import report_max_logit_delta
from webui_harness import WebuiHarness, image_part, text_part
from webui_llava_support import (  # noqa: F401 - harness_for is a fixture
    Loaded, harness_for, hook_calls, image, last_call, last_prompt, marked, slots_in)

QUESTION = "What is in the image?"
ATOL = 1e-5
NEW_TOKENS = 6
MODULES = {"onevision": tiny_onevision, "aya": tiny_aya_vision}
# A non-square picture per family that tiles: OneVision 5x4 grid, downscaled; Aya 3x1 + thumbnail.
PICTURE = {"onevision": (300, 200), "aya": (300, 90)}

max_abs_logit_delta: dict[str, float] = {}


@pytest.fixture(scope="module")
def families(tiny_onevision_checkpoints, tiny_aya_checkpoints):
    loaded = {}
    for family, tiny in (("onevision", tiny_onevision_checkpoints), ("aya", tiny_aya_checkpoints)):
        module = MODULES[family]
        loaded[family] = (Loaded(tiny.hub), module.reference_model(tiny.hub), module.reference_processor(tiny.hub))
    return loaded


@pytest.fixture
def make_harness(families, harness_for):
    def make(family: str, settings: dict | None = None) -> WebuiHarness:
        return harness_for(families[family][0], {"max_new_tokens": NEW_TOKENS, "custom_stopping_strings": "",
                                                 **(settings or {})})

    return make


def _reference(families, family, conversation, pictures):
    """(prompt, input ids, logits, greedy tokens) of the transformers reference for ``conversation``."""
    _, model, processor = families[family]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    nested = [pictures] if family == "onevision" and len(pictures) > 1 else pictures
    bos = processor.tokenizer.bos_token
    inputs = dict(processor(images=nested, text=prompt, return_tensors="pt",
                            add_special_tokens=not (bos and prompt.startswith(bos))))
    inputs.pop("attention_mask", None)
    # webui never samples an id past the tokenizer (the padded rows of OneVision's vocabulary): neither may
    # the reference here.
    beyond = list(range(len(processor.tokenizer), model.config.text_config.vocab_size)) or None
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        out = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=processor.tokenizer.pad_token_id, suppress_tokens=beyond)
    return prompt, inputs["input_ids"][0].tolist(), logits, out[0, inputs["input_ids"].shape[1]:].tolist()


def _check_against_reference(harness, families, family, conversation, pictures):
    prompt, ids, ref_logits, ref_tokens = _reference(families, family, conversation, pictures)
    assert marked(last_prompt(harness)) == prompt
    call = last_call(harness)
    assert call.input_ids[0].tolist() == ids
    with torch.no_grad():
        logits = families[family][0].model(inputs_embeds=call.inputs_embeds).logits[0]
    # Inside webui the ids past the tokenizer (OneVision pads its vocabulary) are masked; every real id's
    # logit is the reference's.
    real = len(families[family][0].tokenizer)
    assert torch.isneginf(logits[:, real:]).all()
    logits, ref_logits = logits[:, :real], ref_logits[:, :real]
    delta = (logits - ref_logits).abs().max().item()
    max_abs_logit_delta[family] = max(max_abs_logit_delta.get(family, 0.0), delta)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert call.error is None and call.output[0, call.input_ids.shape[1]:].tolist() == ref_tokens
    assert len(set(ref_tokens)) > 1


def _user(*items):
    return {"role": "user", "content": list(items)}


@pytest.mark.parametrize("entry_point", ["ui", "api", "api_stream"])
@pytest.mark.parametrize("family", list(MODULES))
def test_one_image_matches_the_reference(family, entry_point, make_harness, families):
    harness = make_harness(family)
    picture = image(*PICTURE[family], seed=3)
    if entry_point == "ui":
        harness.send(QUESTION, [picture])
    else:
        harness.api_chat([{"role": "user", "content": [image_part(picture), text_part(QUESTION)]}],
                         stream=entry_point == "api_stream", max_tokens=NEW_TOKENS)
    assert slots_in(last_prompt(harness)) == [(0, PICTURE[family])]
    _check_against_reference(harness, families, family, [_user({"type": "image"}, {"type": "text", "text": QUESTION})],
                             [picture])


@pytest.mark.parametrize("family", list(MODULES))
def test_images_in_two_turns_with_embed_all(family, make_harness, families):
    """Both images reach the model; a OneVision prompt with two images tiles neither of them."""
    harness = make_harness(family, {"llava-add_all_images_to_prompt": True})
    first, second = image(300, 200, seed=4), image(60, 130, seed=5)
    harness.send("Describe this.", [first])
    reply = harness.history["internal"][-1][1]
    harness.send("And this one?", [second])
    conversation = [
        _user({"type": "image"}, {"type": "text", "text": "Describe this."}),
        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
        _user({"type": "image"}, {"type": "text", "text": "And this one?"}),
    ]
    _check_against_reference(harness, families, family, conversation, [first, second])
    pipeline = families[family][0].pipeline
    if family == "onevision":
        ids = last_call(harness).input_ids[0].tolist()
        assert ids.count(pipeline.spec.image_token_id) == 2 * (pipeline.plan.geometry.base_tokens + 1)


@pytest.mark.parametrize("family", list(MODULES))
def test_two_images_in_one_message(family, make_harness, families):
    """Every image of the newest message reaches the model (the default, "embed all" unchecked); the
    checkpoint's template writes each one (OneVision: ``<image>\n`` each, neither tiled)."""
    harness = make_harness(family)
    first, second = image(168, 84, seed=6), image(60, 200, seed=7)
    harness.send("Compare them.", [first, second])
    assert [index for index, _ in slots_in(last_prompt(harness))] == [0, 1]
    _check_against_reference(harness, families, family,
                             [_user({"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."})],
                             [first, second])


@pytest.mark.parametrize("family", list(MODULES))
def test_token_counts_are_exact(family, make_harness, families):
    """webui's truncation count (``custom_tokenized_length`` on the prompt with its image slots) and the panel's
    per-image cost come from the image sizes alone and equal what reaches the model."""
    harness = make_harness(family)
    entry = families[family][0]
    picture = image(*PICTURE[family], seed=8)
    start = len(harness.hook_calls)
    harness.send(QUESTION, [picture])
    counts = [call for call in hook_calls(harness, "custom_tokenized_length", start) if slots_in(call.args[0])]
    assert counts, "webui never counted the prompt with its image"
    prompt = marked(last_prompt(harness))
    assert counts[-1].args[0] == last_prompt(harness)
    assert counts[-1].result == last_call(harness).input_ids.shape[1]
    # The panel's cost of the picture = the positions its slot takes in the prompt.
    cost = entry.pipeline.prompt_positions(picture.size)
    without = len(entry.tokenizer(prompt.replace("<image>", ""), add_special_tokens=False)["input_ids"])
    assert last_call(harness).input_ids.shape[1] - without == cost
    assert cost > entry.pipeline.prompt_positions((10, 10))  # sizes matter for these families


def test_report_max_logit_delta(record_property):
    report_max_logit_delta(record_property, max_abs_logit_delta, ATOL)
