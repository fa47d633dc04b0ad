"""Parity: our pipeline + text-only LM against transformers' LlavaForConditionalGeneration, per format.

One seeded tiny random model is written in every format (tests/tiny_llava.py). For each format the
reference input is built the way that format's reference builds it:

* hf:   LlavaProcessor (PIL backend) on the prompt with `<image>` tokens, `LlavaForConditionalGeneration`.
* v1.5: LLaVA's `tokenizer_image_token` (text chunks tokenized separately, one slot per `<image>`) with each
        slot expanded to N image-token ids, pad-to-square pixels; the reference model has the same weights.
* v0:   the prompt spelled `<im_start>` + N x `<im_patch>` + `<im_end>`, crop pixels, and the reference with
        a linear projector (identity second layer, llava-formats.md §5.1).
Logits must agree to 1e-5 in fp32 and greedy tokens must be equal.
"""

from __future__ import annotations

import pytest
import torch

from llava_prompt import split_on_marker
from parity_support import load_ours, run_ours
from tiny_llava import make_test_image

NEW_TOKENS = 12

# (prompt with one <image> per image, image sizes (W, H)); images at the start, middle and end, and two.
CASES = {
    "start": ("<image>\nWhat is in this picture?", [(70, 45)]),
    "middle": ("Look at this picture <image> and tell me what it is.", [(45, 90)]),
    "end": ("What is this image about?\n<image>", [(56, 56)]),
    "two": ("<image> first, then <image> second: which is brighter?", [(90, 37), (33, 61)]),
}


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    from transformers import LlavaForConditionalGeneration

    models = {}
    for name, path in (("gelu", tiny_checkpoints.hf_reference), ("linear", tiny_checkpoints.hf_linear_reference)):
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
        models[name] = model.eval()
    return models


@pytest.fixture(scope="module")
def ours(tiny_checkpoints):
    """format name -> (pipeline, language model, tokenizer), each loaded by the project's own code."""
    return load_ours(tiny_checkpoints, ("v0", "v15", "hf", "hf5"))


def _images(sizes):
    return [make_test_image(w, h, seed=w * 1000 + h) for w, h in sizes]


def _run_ours(loaded, prompt, images, marker="<image>"):
    return run_ours(loaded, prompt, images, new_tokens=NEW_TOKENS, marker=marker)


def _run_reference(model, input_ids, pixel_values, vocab):
    suppress = list(range(vocab, model.config.text_config.vocab_size))
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0]
        out = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=suppress or None, pad_token_id=0,
        )
    return logits[:, :vocab], out[0, input_ids.shape[1]:].tolist()


def _assert_parity(ours_logits, our_tokens, ref_logits, ref_tokens):
    assert ours_logits.shape == ref_logits.shape
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=0)
    assert our_tokens == ref_tokens
    assert len(set(our_tokens)) > 1, "the tiny model should not emit one repeated token"


def _clip_processor(tiny, pad: bool):
    from transformers import LlavaImageProcessorPil

    size = tiny.image_size
    return LlavaImageProcessorPil(
        do_pad=pad, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(tiny.image_mean), image_std=list(tiny.image_std), resample=3, do_center_crop=True,
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["hf", "hf5"])
def test_hf_format_matches_llava_for_conditional_generation(fmt, case, tiny_checkpoints, references, ours):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    prompt, sizes = CASES[case]
    images = _images(sizes)
    folder = getattr(tiny_checkpoints, fmt)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(str(folder)),
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        patch_size=tiny_checkpoints.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    ref_logits, ref_tokens = _run_reference(
        references["gelu"], inputs["input_ids"], inputs["pixel_values"], tiny_checkpoints.padded_vocab
    )
    prepared, logits, tokens = _run_ours(ours[fmt], prompt, images)
    assert prepared.input_ids.tolist() == inputs["input_ids"].tolist()
    _assert_parity(logits, tokens, ref_logits, ref_tokens)


def _tokenizer_image_token(tokenizer, prompt: str, image_token_id: int, n: int) -> list[int]:
    """LLaVA's llava/mm_utils.py tokenizer_image_token, written from its description (llava-formats.md
    §2.4): chunks tokenized separately with the tokenizer's BOS, BOS kept once at the start, each image
    slot then expanded to n reference image-token ids (§5.2)."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]] if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else []
    for index, chunk in enumerate(chunks):
        if index:
            ids += [image_token_id] * n
        ids += chunk[1:] if chunk and chunk[0] == tokenizer.bos_token_id else chunk
    return ids


@pytest.mark.parametrize("case", list(CASES))
def test_original_v15_matches_reference(case, tiny_checkpoints, references, ours):
    prompt, sizes = CASES[case]
    images = _images(sizes)
    pipeline, _, tokenizer = ours["v15"]
    ids = _tokenizer_image_token(tokenizer, prompt, tiny_checkpoints.image_token_id, tiny_checkpoints.tokens_per_image)
    pixels = _clip_processor(tiny_checkpoints, pad=True)(images, return_tensors="pt")["pixel_values"]
    ref_logits, ref_tokens = _run_reference(
        references["gelu"], torch.tensor([ids]), pixels, tiny_checkpoints.base_vocab
    )
    prepared, logits, tokens = _run_ours(ours["v15"], prompt, images)
    placeholder = pipeline.placeholder_id(tokenizer)
    expected_ids = [placeholder if i == tiny_checkpoints.image_token_id else i for i in ids]
    assert prepared.input_ids[0].tolist() == expected_ids
    _assert_parity(logits, tokens, ref_logits, ref_tokens)


@pytest.mark.parametrize("case", list(CASES))
def test_original_v0_matches_linear_reference(case, tiny_checkpoints, references, ours):
    prompt, sizes = CASES[case]
    images = _images(sizes)
    n = tiny_checkpoints.tokens_per_image
    spelled = prompt.replace("<image>", "<im_start>" + "<im_patch>" * n + "<im_end>")
    _, _, tokenizer = ours["v0"]
    ids = tokenizer(spelled)["input_ids"]
    assert ids.count(tiny_checkpoints.im_patch_id) == n * len(images)
    pixels = _clip_processor(tiny_checkpoints, pad=False)(images, return_tensors="pt")["pixel_values"]
    ref_logits, ref_tokens = _run_reference(references["linear"], torch.tensor([ids]), pixels, tiny_checkpoints.v0_vocab)
    prepared, logits, tokens = _run_ours(ours["v0"], prompt, images)
    assert prepared.input_ids[0].tolist() == ids
    _assert_parity(logits, tokens, ref_logits, ref_tokens)


def test_image_changes_the_answer(ours):
    """Guards the parity tests against a pipeline that ignores images (both sides would still agree)."""
    prompt = "<image>\nWhat is in this picture?"
    _, logits_a, _ = _run_ours(ours["hf"], prompt, _images([(70, 45)]))
    _, logits_b, _ = _run_ours(ours["hf"], prompt, [make_test_image(70, 45, seed=999)])
    assert (logits_a - logits_b).abs().max() > 1e-2


def test_user_typed_image_token_is_text_not_an_image(tiny_checkpoints, ours):
    """`<image>` typed in text that is not an image slot keeps its token but never receives features."""
    pipeline, model, tokenizer = ours["hf"]
    parts = ["I typed <image> myself. ", *split_on_marker("<image>\nWhat?", 1)]
    prepared = pipeline.prepare(parts, _images([(70, 45)]), tokenizer, model.get_input_embeddings(), add_bos=True)
    ids = prepared.input_ids[0].tolist()
    n = tiny_checkpoints.tokens_per_image
    assert ids.count(tiny_checkpoints.image_token_id) == n + 1
    assert [s.length for s in prepared.prompt.image_spans] == [n]
    typed = ids.index(tiny_checkpoints.image_token_id)
    assert typed < prepared.prompt.image_spans[0].start
    embedding_row = model.get_input_embeddings().weight[tiny_checkpoints.image_token_id]
    torch.testing.assert_close(prepared.inputs_embeds[0, typed], embedding_row, atol=0, rtol=0)


def test_count_mismatch_names_both_numbers(ours):
    from llava_pipeline import LlavaInputError

    pipeline, model, tokenizer = ours["v15"]
    parts = split_on_marker("<image> and <image>", 2)
    with pytest.raises(LlavaInputError, match=r"2 image slot\(s\) for 1 image\(s\)"):
        pipeline.prepare(parts, _images([(20, 20)]), tokenizer, model.get_input_embeddings(), add_bos=True)


@pytest.mark.parametrize("fmt", ["v0", "v15", "hf"])
def test_truncation_drops_whole_images(fmt, tiny_checkpoints, ours):
    pipeline, model, tokenizer = ours[fmt]
    images = _images([(40, 40), (50, 30)])
    parts = split_on_marker("first <image> then a long text in the middle <image> last words", 2)
    full = pipeline.tokenize(parts, tokenizer, add_bos=True)
    second = full.image_spans[1]
    # Cut inside the first image: it must go whole, the second stays whole.
    budget = len(full.ids) - full.image_spans[0].start - 2
    prepared = pipeline.prepare(parts, images, tokenizer, model.get_input_embeddings(), add_bos=True, max_length=budget)
    assert prepared.dropped_images == [0]
    assert prepared.images_used == 1
    assert len(prepared.prompt.image_spans) == 1
    assert prepared.prompt.image_spans[0].length == second.length
    assert prepared.input_ids.shape[1] == prepared.inputs_embeds.shape[1] <= budget
    kept = prepared.prompt.image_spans[0]
    expected = pipeline.encode_images([images[1]])[0]
    torch.testing.assert_close(prepared.inputs_embeds[0, kept.start:kept.end], expected)


@pytest.mark.parametrize("fmt", ["v0", "v15", "hf"])
def test_image_positions_survive_generate_without_attention_mask(fmt, ours):
    """webui calls generate() without an attention mask; transformers then masks every pad id in the
    prompt, so a placeholder id equal to the pad id (LLaVA-1.5: <unk> = 0) would hide the image."""
    pipeline, model, tokenizer = ours[fmt]
    prepared = pipeline.prepare(
        split_on_marker("<image>\nWhat is in this picture?", 1), _images([(70, 45)]), tokenizer,
        model.get_input_embeddings(), add_bos=True,
    )
    pad_ids = {tokenizer.pad_token_id, model.generation_config.pad_token_id, model.config.pad_token_id} - {None}
    span = prepared.prompt.image_spans[0]
    assert not pad_ids & set(prepared.input_ids[0, span.start:span.end].tolist())
    with torch.no_grad():
        kwargs = dict(input_ids=prepared.input_ids, inputs_embeds=prepared.inputs_embeds, max_new_tokens=6,
                      do_sample=False, pad_token_id=model.generation_config.pad_token_id)
        unmasked = model.generate(**kwargs)
        masked = model.generate(attention_mask=torch.ones_like(prepared.input_ids), **kwargs)
    assert unmasked.tolist() == masked.tolist()
