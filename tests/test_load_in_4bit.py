"""A 4-bit language model (bitsandbytes, as webui's --load-in-4bit and the CLI's load it) beside the
extension's own vision part, for every family.

bitsandbytes' CPU backend quantizes and runs the tiny language models here. Quantization touches only the
language model's linear layers: the input embeddings, and so every spliced row (text and image), must be
exactly those of the full-precision model, with the vision tower and projector left at their own device and
dtype; generation then runs on the quantized model.
"""

from __future__ import annotations

import pytest
import torch

from parity_support import CPU, run_ours
from llava_checkpoint import load_language_model
from llava_pipeline import LlavaPipeline
from tiny_llava import make_test_image

bnb = pytest.importorskip("bitsandbytes")

# name -> (session fixture, attribute holding the folder)
CHECKPOINTS = {
    "v0": ("tiny_checkpoints", "v0"),
    "v15": ("tiny_checkpoints", "v15"),
    "llava-hf": ("tiny_checkpoints", "hf"),
    "next-hf": ("tiny_next_checkpoints", "next_hf"),
    "next-original": ("tiny_next_checkpoints", "next_orig"),
    "vipllava": ("tiny_family_checkpoints", "vipllava"),
    "pixtral": ("tiny_family_checkpoints", "pixtral"),
    "mistral3": ("tiny_family_checkpoints", "mistral3"),
    "onevision": ("tiny_onevision_checkpoints", "hub"),
    "aya": ("tiny_aya_checkpoints", "hub"),
}
NEW_TOKENS = 4


def _four_bit(folder):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return load_language_model(folder, dtype=torch.float32, device_map="cpu", quantization_config=config).eval()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_a_4bit_language_model_gets_the_same_spliced_inputs(name, request, caplog):
    from transformers import AutoTokenizer

    fixture, attribute = CHECKPOINTS[name]
    folder = getattr(request.getfixturevalue(fixture), attribute)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with caplog.at_level("INFO", logger="llava_checkpoint"):
        quantized = _four_bit(folder)
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in quantized.modules())
    assert "format, 4-bit)" in caplog.text
    full = load_language_model(folder, dtype=torch.float32).eval()
    pipeline = LlavaPipeline.load(folder, CPU, lm_hidden_size=quantized.config.hidden_size)
    prompt = "USER: <image>\nWhat is in this picture? ASSISTANT:"
    picture = make_test_image(70, 45, seed=4)

    ours_4bit, logits_4bit, new_4bit = run_ours((pipeline, quantized, tokenizer), prompt, [picture],
                                                new_tokens=NEW_TOKENS)
    ours_full, logits_full, _ = run_ours((pipeline, full, tokenizer), prompt, [picture], new_tokens=NEW_TOKENS)

    assert torch.equal(ours_4bit.input_ids, ours_full.input_ids)
    assert ours_4bit.images_used == 1
    assert torch.equal(ours_4bit.inputs_embeds, ours_full.inputs_embeds)
    for module in (pipeline.tower, pipeline.projector):
        parameter = next(module.parameters())
        assert (parameter.device.type, parameter.dtype) == ("cpu", torch.float32)
    assert logits_4bit.shape == logits_full.shape and torch.isfinite(logits_4bit).all()
    assert not torch.equal(logits_4bit, logits_full), "the 4-bit model computed exactly the full one's logits"
    assert 1 <= len(new_4bit) <= NEW_TOKENS
