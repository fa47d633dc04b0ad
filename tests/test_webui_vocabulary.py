"""Ids past the tokenizer never reach webui's code (issue 13, item 4).

llava-hf checkpoints pad the language model's vocabulary past the tokenizer (32064 rows for 32002 tokens;
the tiny checkpoint pads too). webui turns every id it meets into text, and its ``LogprobProcessor`` is
a logits processor of the request, so it sees the scores before any processor an extension appends: an
id without a token among the top candidates, or as the reply's first token, fails with
``'NoneType' object has no attribute 'startswith'`` (seen in a real webui 1dcde41d; the stand-in's
``get_reply_from_output_ids`` fails the same way). The extension masks those ids in the model's output.
"""

from __future__ import annotations

import logging

import pytest
import torch

from llava_checkpoint import load_language_model
from webui_harness import WebuiHarness, image_part, text_part
from webui_llava_support import EXTENSION_DIR, image, loaded  # noqa: F401 - fixture

from modules import models, shared  # noqa: E402


def padding_wins(folder):
    """The tiny llava-hf language model with its padding rows made to win every step: each padding row is
    ten times a real row, so without the mask greedy decoding picks one and top-k lists several."""
    model = load_language_model(folder, dtype=torch.float32).eval()
    weight = model.get_output_embeddings().weight
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    real = len(tokenizer)
    with torch.no_grad():
        for row in range(real, weight.shape[0]):
            weight[row] = 10 * weight[(row * 7) % real]
    return model, tokenizer


@pytest.fixture
def harness(tiny_checkpoints):
    model, tokenizer = padding_wins(tiny_checkpoints.hf)
    with WebuiHarness(EXTENSION_DIR, model, tokenizer, {"mode": "instruct", "max_new_tokens": 5},
                      args={"model_dir": str(tiny_checkpoints.hf.parent), "cpu": True},
                      model_name=tiny_checkpoints.hf.name) as made:
        yield made


def generated_ids(harness) -> list[int]:
    call = harness.generate_calls[-1]
    assert call.error is None and call.output is not None
    return call.output[0, call.input_ids.shape[1]:].tolist()


QUESTION = [{"role": "user", "content": [image_part(image(40, 30)), text_part("What is this?")]}]


@pytest.mark.parametrize("endpoint", ["chat", "chat_stream", "completions", "completions_stream"])
def test_logprobs_with_a_padded_vocabulary_complete(harness, endpoint, caplog):
    real = len(shared.tokenizer)
    assert shared.model.get_output_embeddings().weight.shape[0] > real
    with caplog.at_level(logging.ERROR, logger="textgen"):
        if endpoint.startswith("chat"):
            reply = harness.api_chat(QUESTION, stream=endpoint.endswith("stream"), logprobs=True, top_logprobs=5,
                                     ban_eos_token=True)
        else:
            reply = harness.api_completions(messages=QUESTION, stream=endpoint.endswith("stream"), logprobs=5,
                                            ban_eos_token=True)
    assert "Failed" not in caplog.text
    ids = generated_ids(harness)
    assert len(ids) == 5 and max(ids) < real, ids
    assert reply
    response = harness.last_api_response
    if endpoint == "chat":
        entries = response["choices"][0]["logprobs"]["content"]
        # webui keys the candidates by their text, so ids that decode alike count once.
        assert len(entries) == 5 and all(1 <= len(entry["top_logprobs"]) <= 5 for entry in entries)
    elif endpoint == "completions":
        assert len(response["choices"][0]["logprobs"]["top_logprobs"]) == 5
    else:
        assert any(chunk["choices"][0].get("logprobs") for chunk in response)


def test_real_token_logits_are_unchanged(harness, tiny_checkpoints):
    masked_model = shared.model
    plain, tokenizer = padding_wins(tiny_checkpoints.hf)
    real = len(tokenizer)
    ids = tokenizer("USER: what is in this picture? ASSISTANT:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        masked, unmasked = masked_model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(masked[..., :real], unmasked[..., :real])
    assert torch.isneginf(masked[..., real:]).all()
    # Without the mask these rows would win (what made a real webui fail).
    assert unmasked[0, -1].argmax() >= real


def test_models_webui_loads_are_masked_from_the_start(harness, tiny_checkpoints):
    """Through webui's Transformers loader the mask is there before any hook ran (/v1/internal/logits
    and prompt logprobs run the model without extension hooks)."""
    harness.unload_model()
    shared.model, shared.tokenizer = models.load_model(tiny_checkpoints.hf.name)
    real = len(shared.tokenizer)
    ids = shared.tokenizer("USER: hello ASSISTANT:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = shared.model(input_ids=ids).logits
    assert logits.shape[-1] > real and torch.isneginf(logits[..., real:]).all()
    assert torch.isfinite(logits[..., :real]).all()


def test_without_a_tokenizer_nothing_is_masked(harness):
    model = shared.model
    shared.tokenizer = None  # webui unloaded the model; the object may still run (nothing to compare with)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6]])).logits
    assert torch.isfinite(logits).all()
