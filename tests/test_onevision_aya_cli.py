"""The CLI, unchanged, on LLaVA-OneVision and Aya Vision: with the checkpoint's own chat template and with
``--raw`` (each ``<image>`` marks the next image), one subprocess each, two at a time. stdout must equal
what the transformers reference decodes greedily for the same prompt and images."""

from __future__ import annotations

import pytest
import torch

import tiny_aya_vision
import tiny_onevision
from test_cli import cli_args, cli_runs_started, write_image_files
from tiny_llava import make_test_image

NEW_TOKENS = 8
QUESTION = "What is in the image?"
IMAGES = {"wide": (300, 200), "tall": (60, 200), "square": (84, 84)}
# case -> (family, layout, raw prompt or None for the chat template, image keys)
CASES = {
    "onevision_template": ("onevision", "hub", None, ["wide"]),
    "onevision_raw_two": ("onevision", "saved5",
                          "<|im_start|>user\n<image>\n<image>\nWhich one is brighter?<|im_end|>\n<|im_start|>assistant\n",
                          ["wide", "tall"]),
    "aya_template": ("aya", "hub", None, ["wide"]),
    "aya_raw": ("aya", "saved5", "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Look: <image> What is it?<|END_OF_TURN_TOKEN|>"
                "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", ["square"]),
}
MODULES = {"onevision": tiny_onevision, "aya": tiny_aya_vision}


def _images(keys):
    return [make_test_image(*IMAGES[key], seed=IMAGES[key][0] * 31 + IMAGES[key][1]) for key in keys]


@pytest.fixture(scope="module")
def folders(tiny_onevision_checkpoints, tiny_aya_checkpoints):
    return {"onevision": tiny_onevision_checkpoints, "aya": tiny_aya_checkpoints}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    return write_image_files(tmp_path_factory.mktemp("family_cli_images"), {key: _images([key])[0] for key in IMAGES})


@pytest.fixture(scope="module")
def runs(folders, image_files, tmp_path_factory):
    args = {case: cli_args(getattr(folders[family], layout), keys, image_files, raw, question=QUESTION,
                           new_tokens=NEW_TOKENS)
            for case, (family, layout, raw, keys) in CASES.items()}
    with cli_runs_started(args, tmp_path_factory.mktemp("empty_hf_home")) as futures:
        yield futures


def _reference_reply(folders, case) -> str:
    family, layout, raw, keys = CASES[case]
    folder = getattr(folders[family], layout)
    module = MODULES[family]
    model, processor = module.reference_model(folder), module.reference_processor(folder)
    images = _images(keys)
    tokenizer = processor.tokenizer
    if raw is None:
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": QUESTION}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        prompt = raw
    nested = [images] if family == "onevision" and len(images) > 1 else images
    add_special = not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
    inputs = dict(processor(images=nested, text=prompt, return_tensors="pt", add_special_tokens=add_special))
    inputs.pop("attention_mask", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]),
                                max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("case", list(CASES))
def test_cli_reply_equals_transformers_reference(case, folders, runs):
    expected = _reference_reply(folders, case)
    run = runs[case].result()
    assert run.returncode == 0, run.describe()
    assert expected, "the reference produced an empty reply; the comparison would prove nothing"
    assert run.stdout == expected + "\n", run.describe()
    assert "Traceback" not in run.stderr, run.describe()
