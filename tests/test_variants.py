"""Other Llava-family checkpoints: llava-hf on Mistral (BakLLaVA), on Qwen2 with a SigLIP tower
(llava-interleave style: ``vision_feature_layer -1``, ``"full"``, no CLS, image token V+3), on Llama with
``vision_feature_layer [-2, -1]``; template choice of original checkpoints; and the CLI, unchanged, on every
NeXT and variant checkpoint (one subprocess each, all started at once, two at a time).

Parity: our pipeline + text-only LM against transformers' ``LlavaForConditionalGeneration`` with
``LlavaProcessor`` and the checkpoint's image processor on the PIL backend: logits within 1e-5 (fp32),
equal greedy tokens. CLI: stdout equals what the transformers reference decodes greedily.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import llava_checkpoint
from llava_checkpoint import read_llava_spec
from llava_pipeline import LlavaPipeline
import original_llava
from parity_support import CPU, load_ours, run_ours, report_max_logit_delta
from tiny_llava import make_test_image

NEW_TOKENS = 10
ATOL = 1e-5
VARIANTS = ("bakllava", "qwen_siglip", "multilayer")
IMAGE_PROCESSORS = {"bakllava": "CLIPImageProcessorPil", "qwen_siglip": "SiglipImageProcessorPil",
                    "multilayer": "CLIPImageProcessorPil"}
CASES = {
    "one": ("<image>\nWhat is in this picture?", [(70, 45)]),
    "two": ("Look at <image> and then <image>: which is brighter?", [(45, 90), (120, 33)]),
}

max_abs_logit_delta: dict[str, float] = {}


def _images(sizes, salt=0):
    return [make_test_image(w, h, seed=w * 1000 + h + salt) for w, h in sizes]


def _hf_processor(folder: Path):
    import transformers
    from transformers import AutoTokenizer, LlavaProcessor

    settings = json.loads((folder / "processor_config.json").read_text())
    image_processor_class = getattr(transformers, IMAGE_PROCESSORS[folder.name])
    return LlavaProcessor(
        image_processor=image_processor_class.from_pretrained(str(folder)),
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        patch_size=settings["patch_size"], vision_feature_select_strategy=settings["vision_feature_select_strategy"],
        num_additional_image_tokens=settings["num_additional_image_tokens"], image_token=settings["image_token"],
    )


@pytest.fixture(scope="module")
def references(tiny_next_checkpoints):
    from transformers import LlavaForConditionalGeneration

    loaded = {}
    for name in VARIANTS:
        folder = getattr(tiny_next_checkpoints, name)
        model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
        loaded[name] = (model, _hf_processor(folder))
    return loaded


@pytest.fixture(scope="module")
def ours(tiny_next_checkpoints):
    return load_ours(tiny_next_checkpoints, VARIANTS)


def _run_ours(loaded, prompt, images):
    return run_ours(loaded, prompt, images, new_tokens=NEW_TOKENS, pad_token_id=loaded[2].pad_token_id)


def _run_reference(model, inputs, pad_token_id):
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0]
        out = model.generate(
            input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
            attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=pad_token_id,
        )
    return logits, out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", VARIANTS)
def test_variant_matches_llava_for_conditional_generation(kind, case, references, ours):
    prompt, sizes = CASES[case]
    images = _images(sizes)
    model, processor = references[kind]
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    pad = processor.tokenizer.pad_token_id
    ref_logits, ref_tokens = _run_reference(model, inputs, pad)
    prepared, logits, tokens = _run_ours(ours[kind], prompt, images)
    assert prepared.input_ids.tolist() == inputs["input_ids"].tolist()
    assert logits.shape == ref_logits.shape
    max_abs_logit_delta[kind] = max(max_abs_logit_delta.get(kind, 0.0), (logits - ref_logits).abs().max().item())
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert tokens == ref_tokens
    assert len(set(tokens)) > 1


def test_variant_specs(tiny_next_checkpoints, ours):
    qwen, multilayer, bakllava = (ours[name][0] for name in ("qwen_siglip", "multilayer", "bakllava"))
    # SigLIP: no CLS row exists, so "full" keeps all 16 patch rows; the image token is V+3, not V.
    assert (qwen.spec.keep_cls, qwen.spec.vision_feature_layers, qwen.tower.model_type) == (True, (-1,), "siglip_vision_model")
    assert qwen.tokens_per_image == 16
    assert qwen.spec.image_token_id == tiny_next_checkpoints.qwen_image_token_id == tiny_next_checkpoints.qwen_base_vocab + 3
    assert qwen.preprocess_config.expected_size == (tiny_next_checkpoints.tile,) * 2
    assert not qwen.preprocess_config.do_center_crop
    assert type(ours["qwen_siglip"][1]).__name__ == "Qwen2ForCausalLM"
    # Two layers concatenated: the projector reads 2 x the tower width.
    assert multilayer.spec.vision_feature_layers == (-2, -1)
    assert multilayer.tower.feature_size == 2 * multilayer.tower.hidden_size == multilayer.projector.layers[0].in_features
    assert (bakllava.spec.text_model_type, type(ours["bakllava"][1]).__name__) == ("mistral", "MistralForCausalLM")


def test_image_changes_the_answer_for_each_variant(ours):
    """Guards the parity tests against a pipeline that ignores images (both sides would still agree)."""
    prompt, sizes = CASES["one"]
    for kind in VARIANTS:
        _, logits_a, _ = _run_ours(ours[kind], prompt, _images(sizes))
        _, logits_b, _ = _run_ours(ours[kind], prompt, _images(sizes, salt=77))
        assert (logits_a - logits_b).abs().max() > 1e-2, kind


@pytest.mark.parametrize("dir_name, text_model_type, expected", [
    ("llava-v1.6-mistral-7b", "mistral", "mistral_instruct"),
    ("some-finetune", "mistral", "mistral_instruct"),
    ("llava-v1.6-34b", "llama", "chatml_direct"),
    ("llava-v1.6-vicuna-13b", "llama", "llava_v1"),
    ("llava-v1.5-7b", "llama", "llava_v1"),
    ("llava-llama-2-13b-chat-lightning-preview", "llama", "llava_llama_2"),
    ("LLaVA_Llama_2_7b", "llama", "llava_llama_2"),
])
def test_default_template_name(dir_name, text_model_type, expected):
    assert llava_checkpoint.default_template_name(dir_name, "v1", text_model_type) == expected


def test_template_of_a_34b_named_original_checkpoint(tiny_next_checkpoints, tmp_path):
    """The 34b original config says model_type "llava" (a Llama text model): only the folder name tells."""
    folder = tmp_path / "llava-v1.6-34b"
    folder.mkdir()
    shutil.copy(tiny_next_checkpoints.next_orig / "config.json", folder / "config.json")
    assert read_llava_spec(folder).template == "chatml_direct"
    assert read_llava_spec(tiny_next_checkpoints.next_orig_mistral).template == "mistral_instruct"


def test_report_max_logit_delta(record_property):
    report_max_logit_delta(record_property, max_abs_logit_delta, ATOL)


# ---------------------------------------------------------------------------------------------------------
# The CLI, unchanged, on each NeXT and variant checkpoint

CLI = Path(__file__).resolve().parent.parent / "extensions" / "llava" / "cli.py"
CLI_NEW_TOKENS = 8
QUESTION = "What is in this picture?"
CLI_IMAGES = {"a": (70, 45), "b": (50, 33), "c": (130, 120)}
# kind -> (raw prompt or None for the templated path, image keys). Original NeXT images avoid D1/D2 sizes
# so that the llava-hf NeXT model is their reference (D1/D2 are covered in test_next_parity.py).
CLI_CASES = {
    "next_hf": ("<image> first, then <image> second: which is brighter?", ["b", "c"]),
    "next_orig": (None, ["a"]),
    "next_orig_mistral": (None, ["c"]),
    "bakllava": (None, ["a"]),
    "qwen_siglip": (None, ["c"]),
    "multilayer": ("What is this image about?\n<image>", ["a"]),
}


# The CLI runner of the CLI tests (same contract: stdout, stderr, exit status, wall time).
from test_cli import cli_args, cli_runs_started, write_image_files  # noqa: E402


@pytest.fixture(scope="module")
def cli_image_files(tmp_path_factory):
    return write_image_files(tmp_path_factory.mktemp("variant_cli_images"),
                             {key: _images([size])[0] for key, size in CLI_IMAGES.items()})


@pytest.fixture(scope="module")
def cli_runs(tiny_next_checkpoints, cli_image_files, tmp_path_factory):
    runs = {kind: cli_args(getattr(tiny_next_checkpoints, kind), keys, cli_image_files, raw_prompt,
                           question=QUESTION, new_tokens=CLI_NEW_TOKENS)
            for kind, (raw_prompt, keys) in CLI_CASES.items()}
    with cli_runs_started(runs, tmp_path_factory.mktemp("empty_hf_home")) as futures:
        yield futures


def _cli_reference_reply(tiny, kind: str, images) -> str:
    """What the transformers reference answers greedily to the prompt the CLI should build."""
    from transformers import (AutoTokenizer, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    raw_prompt, _ = CLI_CASES[kind]
    folder = getattr(tiny, kind)
    if kind in ("next_orig", "next_orig_mistral"):
        spec = read_llava_spec(folder)
        prompt = original_llava.prompt_for(spec.template, [(QUESTION, len(images), None)])
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        pipeline = LlavaPipeline.load(folder, CPU, lm_hidden_size=64)
        counts = [pipeline.image_tokens(image.size) for image in images]
        chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split("<image>")]
        ids = chunks[0]
        for count, chunk in zip(counts, chunks[1:]):
            ids = ids + [tiny.image_token_id] * count + chunk[1:]
        model = LlavaNextForConditionalGeneration.from_pretrained(str(tiny.next_hf), dtype=torch.float32).eval()
        pixels = LlavaNextImageProcessorPil.from_pretrained(str(tiny.next_hf))(images, return_tensors="pt")
        inputs = {"input_ids": torch.tensor([ids]), **pixels}
        suppress = list(range(tiny.base_vocab, tiny.padded_vocab))
    else:
        if kind == "next_hf":
            model = LlavaNextForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
            processor = LlavaNextProcessor(
                image_processor=LlavaNextImageProcessorPil.from_pretrained(str(folder)),
                tokenizer=AutoTokenizer.from_pretrained(str(folder)), patch_size=tiny.patch_size,
                vision_feature_select_strategy="default", num_additional_image_tokens=1)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
            processor = _hf_processor(folder)
        tokenizer = processor.tokenizer
        if raw_prompt:
            prompt = raw_prompt
        else:
            template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
            content = [{"type": "image"}] * len(images) + [{"type": "text", "text": QUESTION}]
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                                   add_generation_prompt=True, tokenize=False)
        inputs = dict(processor(images=images, text=prompt, return_tensors="pt"))
        inputs.pop("attention_mask", None)
        suppress = None
    with torch.no_grad():
        output = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]),
                                max_new_tokens=CLI_NEW_TOKENS, do_sample=False, suppress_tokens=suppress,
                                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("kind", list(CLI_CASES))
def test_cli_reply_equals_transformers_reference(kind, tiny_next_checkpoints, cli_runs):
    images = _images([CLI_IMAGES[key] for key in CLI_CASES[kind][1]])
    expected = _cli_reference_reply(tiny_next_checkpoints, kind, images)
    run = cli_runs[kind].result()
    assert run.returncode == 0, run.describe()
    assert expected, "the reference produced an empty reply; the comparison would prove nothing"
    assert run.stdout == expected + "\n", run.describe()
    assert "Traceback" not in run.stderr, run.describe()
