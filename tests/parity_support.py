"""Shared by the parity tests: load a checkpoint with the project's own code and run it greedily."""

from __future__ import annotations

import torch

from llava_checkpoint import load_language_model
from llava_pipeline import LlavaPipeline, VisionSettings
from llava_prompt import split_on_marker

CPU = VisionSettings(clip_device="cpu", projector_device="cpu")


def load_ours(checkpoints, names) -> dict:
    """name -> (pipeline, language model, tokenizer) for ``getattr(checkpoints, name)``, fp32 on the CPU."""
    from transformers import AutoTokenizer

    loaded = {}
    for name in names:
        folder = getattr(checkpoints, name)
        model = load_language_model(folder, dtype=torch.float32).eval()
        pipeline = LlavaPipeline.load(folder, CPU, lm_hidden_size=model.config.hidden_size)
        loaded[name] = (pipeline, model, AutoTokenizer.from_pretrained(str(folder)))
    return loaded


def run_ours(loaded, prompt: str, images, *, new_tokens: int, marker: str = "<image>", pad_token_id: int | None = 0):
    """-> (prepared inputs, logits ``[T, V]`` of the whole prompt, greedy new token ids)."""
    pipeline, model, tokenizer = loaded
    prepared = pipeline.prepare(
        split_on_marker(prompt, len(images), marker), images, tokenizer, model.get_input_embeddings(), add_bos=True
    )
    with torch.no_grad():
        logits = model(inputs_embeds=prepared.inputs_embeds).logits[0]
        out = model.generate(
            input_ids=prepared.input_ids, inputs_embeds=prepared.inputs_embeds,
            attention_mask=torch.ones_like(prepared.input_ids), max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=pad_token_id,
        )
    assert prepared.input_ids.shape[1] == prepared.inputs_embeds.shape[1]
    return prepared, logits, out[0, prepared.input_ids.shape[1]:].tolist()


def report_max_logit_delta(record_property, deltas: dict, atol: float) -> None:
    """Record and print the largest |Δlogit| seen per checkpoint kind (see -rA / junit); all <= atol."""
    import pytest

    if not deltas:
        pytest.skip("no parity test ran")
    for kind, delta in deltas.items():
        record_property(f"max_abs_logit_delta[{kind}]", delta)
    print("\nmax |Δlogit|: " + ", ".join(f"{k}: {v:.2e}" for k, v in sorted(deltas.items())))
    assert all(delta <= atol for delta in deltas.values())
