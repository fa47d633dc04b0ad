"""Parity for LLaVA-OneVision and Aya Vision: our pipeline + the text-only language model (as webui and
the CLI load it) against transformers' ``LlavaOnevisionForConditionalGeneration`` /
``AyaVisionForConditionalGeneration`` with their processors on the PIL backend, in fp32 on the CPU.

Both hub layouts (transformers 4.x keys, as on the hub) and transformers 5.6 saves; non-square images that
tile, unpad, downscale (OneVision's anyres_max_9) or fill the 12-tile limit (Aya), a prompt with two images
(OneVision then tiles neither), and the checkpoints' own chat templates. Logits within 1e-5, same greedy
tokens, same input ids. Aya's language model loaded alone must not apply Cohere2's ``logit_scale``, which
the reference's head skips: its logits and so its sampling equal the reference's.
"""

from __future__ import annotations

import pytest
import torch

import tiny_aya_vision
import tiny_onevision
from llava_checkpoint import load_language_model, text_config_for
from llava_pipeline import LlavaPipeline
from llava_prompt import split_on_marker
from parity_support import CPU, report_max_logit_delta
from tiny_llava import make_test_image

NEW_TOKENS = 10
ATOL = 1e-5
QUESTION = "What is in the image?"
# name -> (sizes (W, H); what each exercises is asserted in test_cases_cover_what_they_claim)
ONEVISION_CASES = {
    "downscaled": [(300, 200)],  # 5x4 grid, rows unpadded (16 -> 14), 14x20 map downscaled to 10x14
    "kept": [(97, 262)],  # 2x5 grid, ratio 1.05: not downscaled
    "one_tile": [(60, 60)],
    "two_images": [(45, 90), (300, 120)],  # several images: one tile each, no tiling
}
AYA_CASES = {
    "three_tiles": [(300, 90)],  # 3x1 + thumbnail
    "one_tile": [(84, 84)],
    "twelve_tiles": [(400, 300)],  # 4x3, the limit
    "two_images": [(168, 84), (60, 200)],
}

max_abs_logit_delta: dict[str, float] = {}


def _images(sizes, salt=0):
    return [make_test_image(w, h, seed=w * 1009 + h + salt) for w, h in sizes]


def _load_ours(folder):
    from transformers import AutoTokenizer

    model = load_language_model(folder, dtype=torch.float32).eval()
    pipeline = LlavaPipeline.load(folder, CPU, lm_hidden_size=model.config.hidden_size)
    return pipeline, model, AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def onevision(tiny_onevision_checkpoints):
    tiny = tiny_onevision_checkpoints
    return {
        "reference": (tiny_onevision.reference_model(tiny.hub), tiny_onevision.reference_processor(tiny.hub)),
        "hub": _load_ours(tiny.hub), "saved5": _load_ours(tiny.saved5), "tiny": tiny,
    }


@pytest.fixture(scope="module")
def aya(tiny_aya_checkpoints):
    tiny = tiny_aya_checkpoints
    return {
        "reference": (tiny_aya_vision.reference_model(tiny.hub), tiny_aya_vision.reference_processor(tiny.hub)),
        "hub": _load_ours(tiny.hub), "saved5": _load_ours(tiny.saved5), "tiny": tiny,
    }


def _chat_prompt(processor, image_count: int) -> str:
    content = [{"type": "image"}] * image_count + [{"type": "text", "text": QUESTION}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _reference_inputs(family: str, processor, prompt: str, images):
    if family == "onevision":
        # A prompt's images as one nested list: the processor then knows they share a prompt.
        return dict(processor(images=[images] if len(images) > 1 else images, text=prompt, return_tensors="pt"))
    bos = processor.tokenizer.bos_token
    return dict(processor(images=images, text=prompt, return_tensors="pt",
                          add_special_tokens=not prompt.startswith(bos)))


def _greedy(model, **inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def _run_reference(family, reference, prompt, images):
    model, processor = reference
    inputs = _reference_inputs(family, processor, prompt, images)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    tokens = _greedy(model, **inputs)[0, inputs["input_ids"].shape[1]:].tolist()
    return inputs["input_ids"][0].tolist(), logits, tokens


def _run_ours(loaded, prompt, images):
    pipeline, model, tokenizer = loaded
    parts = split_on_marker(prompt, len(images), "<image>")
    add_bos = not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
    prepared = pipeline.prepare(parts, images, tokenizer, model.get_input_embeddings(), add_bos=add_bos)
    with torch.no_grad():
        logits = model(inputs_embeds=prepared.inputs_embeds).logits[0]
    out = _greedy(model, input_ids=prepared.input_ids, inputs_embeds=prepared.inputs_embeds,
                  attention_mask=torch.ones_like(prepared.input_ids))
    return prepared, logits, out[0, prepared.input_ids.shape[1]:].tolist()


def _check(family, loaded, layout, case, sizes, salt=0):
    reference = loaded["reference"]
    images = _images(sizes, salt)
    prompt = _chat_prompt(reference[1], len(images))
    ref_ids, ref_logits, ref_tokens = _run_reference(family, reference, prompt, images)
    prepared, logits, tokens = _run_ours(loaded[layout], prompt, images)
    assert prepared.input_ids[0].tolist() == ref_ids
    assert logits.shape == ref_logits.shape
    delta = (logits - ref_logits).abs().max().item()
    max_abs_logit_delta[family] = max(max_abs_logit_delta.get(family, 0.0), delta)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert tokens == ref_tokens
    return prepared, tokens


@pytest.mark.parametrize("layout", ["hub", "saved5"])
@pytest.mark.parametrize("case", list(ONEVISION_CASES))
def test_onevision_matches_the_reference(onevision, layout, case):
    prepared, tokens = _check("onevision", onevision, layout, case, ONEVISION_CASES[case])
    assert len(set(tokens)) > 1
    assert prepared.images_used == len(ONEVISION_CASES[case])


@pytest.mark.parametrize("layout", ["hub", "saved5"])
@pytest.mark.parametrize("case", list(AYA_CASES))
def test_aya_matches_the_reference(aya, layout, case):
    prepared, tokens = _check("aya", aya, layout, case, AYA_CASES[case])
    assert len(set(tokens)) > 1


def test_cases_cover_what_they_claim(onevision, aya):
    geometry = onevision["hub"][0].plan.geometry
    ratio = lambda size: geometry.downscale_ratio(*geometry.unpadded_map_size(size))  # noqa: E731
    assert ratio(ONEVISION_CASES["downscaled"][0]) > 1.1 and geometry.grid(ONEVISION_CASES["downscaled"][0]) == (5, 4)
    assert 1.0 < ratio(ONEVISION_CASES["kept"][0]) <= 1.1
    assert geometry.grid((60, 60)) == (1, 1)
    layout = aya["hub"][0].plan.aya_layout
    assert [layout.num_tiles(s[0]) for s in (AYA_CASES["three_tiles"], AYA_CASES["one_tile"], AYA_CASES["twelve_tiles"])] == [4, 1, 13]


def test_images_change_the_answer(onevision, aya):
    """Guards the parity tests against a pipeline that ignores images (both sides would still agree)."""
    for loaded, sizes in ((onevision, [(200, 90)]), (aya, [(300, 90)])):
        prompt = _chat_prompt(loaded["reference"][1], 1)
        _, logits_a, _ = _run_ours(loaded["hub"], prompt, _images(sizes))
        _, logits_b, _ = _run_ours(loaded["hub"], prompt, _images(sizes, salt=5))
        assert (logits_a - logits_b).abs().max() > 1e-2


def test_onevision_tiles_an_image_only_when_it_is_alone(onevision):
    pipeline, _, tokenizer = onevision["hub"]
    image = _images([(200, 90)])[0]
    alone = pipeline.tokenize(split_on_marker("<image> a", 1), tokenizer, add_bos=False, image_sizes=[image.size])
    pair = pipeline.tokenize(split_on_marker("<image> a <image>", 2), tokenizer, add_bos=False,
                             image_sizes=[image.size, image.size])
    assert alone.image_spans[0].length == pipeline.plan.geometry.tokens(image.size, 1) > 17
    assert [span.length for span in pair.image_spans] == [17, 17]
    # One image, two cache entries: its tiled and its single-tile embeddings.
    first = pipeline.encode_images([image], keys=["k"], images_in_prompt=1)[0]
    second = pipeline.encode_images([image], keys=["k"], images_in_prompt=2)[0]
    assert (first.shape[0], second.shape[0]) == (alone.image_spans[0].length, 17)


def test_aya_language_model_skips_logit_scale_like_the_reference(aya):
    tiny = aya["tiny"]
    assert text_config_for(tiny.hub).logit_scale == 1.0
    raw = text_config_for(tiny.hub).to_dict()
    raw["logit_scale"] = tiny.logit_scale
    from transformers import AutoConfig, AutoModelForCausalLM

    scaled = AutoModelForCausalLM.from_pretrained(str(tiny.hub), config=AutoConfig.for_model(**raw),
                                                  key_mapping={r"^language_model\.model\.": "model."}).eval()
    model = aya["hub"][1]
    ids = torch.tensor([[tiny.bos_token_id, 30, 40, 50]])
    with torch.no_grad():
        reference = aya["reference"][0](input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=0, rtol=0)
        # Cohere2ForCausalLM with the checkpoint's own logit_scale: the reference's logits times 0.25.
        torch.testing.assert_close(scaled(input_ids=ids).logits, reference * tiny.logit_scale, atol=1e-6, rtol=0)


def test_report_max_logit_delta(record_property):
    report_max_logit_delta(record_property, max_abs_logit_delta, ATOL)
