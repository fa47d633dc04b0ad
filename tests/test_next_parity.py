"""Parity for LLaVA-NeXT (1.6): our pipeline + text-only LM against the references, in fp32 on the CPU.

* llava-hf NeXT: transformers' ``LlavaNextForConditionalGeneration`` with ``LlavaNextProcessor`` on the PIL
  backend, for every size (transformers' own semantics: pinpoints (h, w), ``int(round(x, 7))``).
* original 1.6 (``llava`` and ``llava_mistral``): the same weights, so where the two semantics agree the
  HF NeXT reference is the reference (input ids built as LLaVA's ``tokenizer_image_token``). Where they
  disagree (D1 tie-break, D2 rounding; llava-formats.md §5.5) the reference is the independent original
  implementation in ``tiny_llava_next`` (its features spliced into the reference language model).

Logits must agree to 1e-5 and greedy tokens must be equal.
"""

from __future__ import annotations

import pytest
import torch

from llava_next import AnyresGeometry
from llava_pipeline import LlavaPipeline, VisionSettings
from parity_support import load_ours, run_ours, report_max_logit_delta
from tiny_llava import make_test_image
from tiny_llava_next import OriginalNextReference

NEW_TOKENS = 10
ATOL = 1e-5

# Sizes (W, H) at the tiny 56 px tile geometry; what each one exercises is asserted in
# test_size_cases_cover_what_they_claim.
AGREE = {
    "wide": (70, 45),  # 2x1 grid, rows unpadded
    "tall": (45, 90),  # 1x2 grid, columns unpadded
    "big": (130, 120),  # 2x2 grid, downscaled
    "thin_tall": (4, 300),  # 1x3 grid, 1 column of features left
    "thin_wide": (300, 4),  # 3x1 grid, unpadding leaves no feature row at all: base features only
}
D1_TIE = {"tie_wide": (50, 33), "tie_square": (56, 56), "tie_thin": (1, 300)}  # canvas tie: grids differ
D2_ROUND = {"round_tall": (47, 188), "round_wide": (188, 47)}  # int() vs int(round(x, 7)) changes rows
ALL_SIZES = {**AGREE, **D1_TIE, **D2_ROUND}

PROMPTS = {
    "start": "<image>\nWhat is in this picture?",
    "middle": "Look at this picture <image> and tell me what it is.",
    "end": "What is this image about?\n<image>",
    "two": "<image> first, then <image> second: which is brighter?",
}

max_abs_logit_delta: dict[str, float] = {}


def _image(size, salt: int = 0):
    width, height = size
    return make_test_image(width, height, seed=width * 1000 + height + salt)


def _geometries(tiny):
    kwargs = dict(grid_pinpoints=tiny.grid_pinpoints, tile=tiny.tile, side=tiny.side, base_tokens=tiny.base_tokens)
    return AnyresGeometry(hf_semantics=False, **kwargs), AnyresGeometry(hf_semantics=True, **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_next_checkpoints):
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    folder = str(tiny_next_checkpoints.next_hf)
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        patch_size=tiny_next_checkpoints.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


@pytest.fixture(scope="module")
def ours(tiny_next_checkpoints):
    return load_ours(tiny_next_checkpoints, ("next_hf", "next_hf5", "next_orig", "next_orig_mistral"))


@pytest.fixture(scope="module")
def original_reference(tiny_next_checkpoints):
    return OriginalNextReference(tiny_next_checkpoints.next_orig)


def _run_ours(loaded, prompt, images):
    return run_ours(loaded, prompt, images, new_tokens=NEW_TOKENS)


def _generate_reference(model, vocab, **inputs):
    suppress = list(range(vocab, model.config.text_config.vocab_size)) or None
    length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
    mask_source = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"][..., 0]
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        out = model.generate(
            **inputs, attention_mask=torch.ones_like(mask_source, dtype=torch.long), max_new_tokens=NEW_TOKENS,
            do_sample=False, suppress_tokens=suppress, pad_token_id=0,
        )
    return logits[:, :vocab], out[0, length:].tolist()


def _assert_parity(kind, ours_logits, our_tokens, ref_logits, ref_tokens):
    assert ours_logits.shape == ref_logits.shape
    delta = (ours_logits - ref_logits).abs().max().item()
    max_abs_logit_delta[kind] = max(max_abs_logit_delta.get(kind, 0.0), delta)
    torch.testing.assert_close(ours_logits, ref_logits, atol=ATOL, rtol=0)
    assert our_tokens == ref_tokens
    assert len(set(our_tokens)) > 1, "the tiny model should not emit one repeated token"


def _tokenizer_image_token(tokenizer, prompt: str, image_token_id: int, counts: list[int]) -> list[int]:
    """LLaVA's `tokenizer_image_token` (chunks tokenized separately, one BOS), slot i expanded to counts[i]."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]] if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else []
    for index, chunk in enumerate(chunks):
        if index:
            ids += [image_token_id] * counts[index - 1]
        ids += chunk[1:] if chunk and chunk[0] == tokenizer.bos_token_id else chunk
    return ids


# ---------------------------------------------------------------------------------------------------------


def test_size_cases_cover_what_they_claim(tiny_next_checkpoints):
    """Guards the case tables: AGREE sizes agree, D1 sizes differ in grid, D2 sizes in rows only."""
    original, hf = _geometries(tiny_next_checkpoints)
    for size in AGREE.values():
        assert original.grid(size) == hf.grid(size) and original.tokens(size) == hf.tokens(size), size
    for size in D1_TIE.values():
        assert max(size) <= tiny_next_checkpoints.tile or min(size) == 1
        assert original.grid(size) != hf.grid(size), size
    for size in D2_ROUND.values():
        assert original.grid(size) == hf.grid(size) and original.tokens(size) != hf.tokens(size), size
    assert hf.feature_map_size(AGREE["thin_wide"])[0] == 0  # base features only


def _check_hf_next(kind, prompt, images, tiny, reference, ours):
    model, processor = reference
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    ref_logits, ref_tokens = _generate_reference(
        model, tiny.padded_vocab, input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
    )
    prepared, logits, tokens = _run_ours(ours[kind], prompt, images)
    assert prepared.input_ids.tolist() == inputs["input_ids"].tolist()
    _assert_parity("llava-hf NeXT", logits, tokens, ref_logits, ref_tokens)


@pytest.mark.parametrize("name", list(ALL_SIZES))
def test_hf_next_matches_llava_next_for_conditional_generation(name, tiny_next_checkpoints, reference, ours):
    prompt = PROMPTS[["start", "middle", "end"][list(ALL_SIZES).index(name) % 3]]
    _check_hf_next("next_hf", prompt, [_image(ALL_SIZES[name])], tiny_next_checkpoints, reference, ours)


@pytest.mark.parametrize("sizes", [[AGREE["big"], D1_TIE["tie_wide"]], [D2_ROUND["round_wide"], AGREE["thin_tall"]]],
                         ids=["big+tie", "round+thin"])
def test_hf_next_two_images(sizes, tiny_next_checkpoints, reference, ours):
    images = [_image(size, salt=7) for size in sizes]
    _check_hf_next("next_hf", PROMPTS["two"], images, tiny_next_checkpoints, reference, ours)


@pytest.mark.parametrize("sizes", [[D2_ROUND["round_tall"]], [D1_TIE["tie_square"], AGREE["wide"]]],
                         ids=["round", "tie+wide"])
def test_hf_next_as_saved_by_transformers_5(sizes, tiny_next_checkpoints, reference, ours):
    """Fresh-model save_pretrained layout: `vision_tower.*` keys, nested image-processor settings."""
    images = [_image(size, salt=3) for size in sizes]
    prompt = PROMPTS["two"] if len(images) == 2 else PROMPTS["end"]
    _check_hf_next("next_hf5", prompt, images, tiny_next_checkpoints, reference, ours)


# The Mistral copy shares every code path past loading with next_orig: two cases suffice for it.
ORIGINAL_AGREE_CASES = [
    ("next_orig", ["wide"]), ("next_orig", ["tall"]), ("next_orig", ["thin_wide"]), ("next_orig", ["big", "thin_tall"]),
    ("next_orig_mistral", ["wide"]), ("next_orig_mistral", ["big", "thin_tall"]),
]


@pytest.mark.parametrize("kind, case", ORIGINAL_AGREE_CASES, ids=[f"{k}-{'+'.join(c)}" for k, c in ORIGINAL_AGREE_CASES])
def test_original_next_matches_hf_reference_where_semantics_agree(kind, case, tiny_next_checkpoints, reference, ours):
    images = [_image(AGREE[name]) for name in case]
    prompt = PROMPTS["two"] if len(images) == 2 else PROMPTS["middle"]
    model, processor = reference
    pixel_inputs = processor.image_processor(images, return_tensors="pt")
    pipeline, _, tokenizer = ours[kind]
    counts = [pipeline.image_tokens(image.size) for image in images]
    ids = _tokenizer_image_token(tokenizer, prompt, tiny_next_checkpoints.image_token_id, counts)
    ref_logits, ref_tokens = _generate_reference(
        model, tiny_next_checkpoints.base_vocab, input_ids=torch.tensor([ids]),
        pixel_values=pixel_inputs["pixel_values"], image_sizes=pixel_inputs["image_sizes"],
    )
    prepared, logits, tokens = _run_ours(ours[kind], prompt, images)
    placeholder = pipeline.placeholder_id(tokenizer)
    assert prepared.input_ids[0].tolist() == [placeholder if i == tiny_next_checkpoints.image_token_id else i for i in ids]
    _assert_parity(f"original 1.6 ({kind})", logits, tokens, ref_logits, ref_tokens)


@pytest.mark.parametrize("case", [["tie_wide"], ["tie_square"], ["tie_thin"], ["round_tall"], ["round_wide", "tie_wide"]],
                         ids="+".join)
def test_original_next_follows_the_original_algorithm_where_semantics_differ(
    case, tiny_next_checkpoints, reference, ours, original_reference
):
    """D1/D2 sizes: features equal the independent original implementation's, and the language model fed
    with those features gives our logits and tokens."""
    import llava_preprocess

    images = [_image(ALL_SIZES[name]) for name in case]
    pipeline, model, tokenizer = ours["next_orig"]
    expected = original_reference.features(images)
    got = pipeline.encode_images(images)
    # The same weights under transformers' semantics: what a wrong semantics choice would give.
    hf_semantics_rows = ours["next_hf"][0].encode_images(images)
    original, hf = _geometries(tiny_next_checkpoints)
    for image, ours_rows, ref_rows, hf_rows in zip(images, got, expected, hf_semantics_rows):
        assert ours_rows.shape == ref_rows.shape == (original.tokens(image.size), model.config.hidden_size)
        # Bit-identical on the CPUs tried; 1e-6 leaves room for another BLAS blocking the fused QKV GEMM.
        torch.testing.assert_close(ours_rows, ref_rows, atol=1e-6, rtol=0)
        assert hf_rows.shape != ref_rows.shape or (hf_rows - ref_rows).abs().max() > 1e-2
        # Pixels: our original-semantics preprocessing is the test-side one, bit for bit.
        assert torch.equal(
            llava_preprocess.process_anyres_image(image, pipeline.preprocess_config, pipeline.spec.grid_pinpoints,
                                                  hf_semantics=False),
            original_reference.pixels(image),
        )

    prompt = PROMPTS["two"] if len(images) == 2 else PROMPTS["start"]
    counts = [len(rows) for rows in expected]
    ids = _tokenizer_image_token(tokenizer, prompt, tiny_next_checkpoints.image_token_id, counts)
    reference_model, _ = reference
    embeds = reference_model.get_input_embeddings()(torch.tensor([ids])).detach().clone()
    image_rows = (torch.tensor(ids) == tiny_next_checkpoints.image_token_id).nonzero().flatten()
    embeds[0, image_rows] = torch.cat(expected)
    ref_logits, ref_tokens = _generate_reference(reference_model, tiny_next_checkpoints.base_vocab, inputs_embeds=embeds)
    _, logits, tokens = _run_ours(ours["next_orig"], prompt, images)
    _assert_parity("original 1.6 (next_orig)", logits, tokens, ref_logits, ref_tokens)


def test_original_next_uses_the_fine_tuned_tower_from_the_checkpoint(tiny_next_checkpoints, ours, original_reference):
    """unfreeze_mm_vision_tower: the tower in the checkpoint, not the (different) one at mm_vision_tower."""
    images = [_image(AGREE["wide"])]
    pipeline, model, _ = ours["next_orig"]
    got = pipeline.encode_images(images)[0]
    torch.testing.assert_close(got, original_reference.features(images)[0], atol=1e-6, rtol=0)
    pretrained = OriginalNextReference(tiny_next_checkpoints.next_orig, tower_weights_from_checkpoint=False)
    assert (got - pretrained.features(images)[0]).abs().max() > 1e-2
    # The mm_vision_tower folder's tower, forced by the override setting, is the other one.
    overridden = LlavaPipeline.load(
        tiny_next_checkpoints.next_orig, VisionSettings(clip_device="cpu", projector_device="cpu",
                                                        vision_tower=str(tiny_next_checkpoints.clip_next)),
        lm_hidden_size=model.config.hidden_size,
    )
    torch.testing.assert_close(overridden.encode_images(images)[0], pretrained.features(images)[0], atol=1e-6, rtol=0)


def test_mistral_original_loads_mistral_and_its_template(ours):
    pipeline, model, _ = ours["next_orig_mistral"]
    assert type(model).__name__ == "MistralForCausalLM"
    assert pipeline.spec.template == "mistral_instruct"
    assert ours["next_orig"][0].spec.template == "llava_v1"


def test_image_changes_the_answer(ours):
    """Guards the parity tests against a pipeline that ignores images."""
    _, logits_a, _ = _run_ours(ours["next_hf"], PROMPTS["start"], [_image(AGREE["big"])])
    _, logits_b, _ = _run_ours(ours["next_hf"], PROMPTS["start"], [_image(AGREE["big"], salt=99)])
    assert (logits_a - logits_b).abs().max() > 1e-2


def test_report_max_logit_delta(record_property):
    """Runs last in this module: the largest |Δlogit| seen per checkpoint kind (see -rA / junit)."""
    report_max_logit_delta(record_property, max_abs_logit_delta, ATOL)
