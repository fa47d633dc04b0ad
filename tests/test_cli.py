"""The command-line tool end to end: `python extensions/llava/cli.py ...` in a subprocess, offline.

Replies are compared with what transformers' `LlavaForConditionalGeneration` decodes greedily for the same
prompt and images (references built as in test_parity.py, decoded with skip_special_tokens and stripped).
stdout must hold exactly that reply; logs go to stderr. Bad input must end with one `error:` line.

Every CLI run pays the transformers import, so all runs are started once per module, two at a time, while
the references are computed in this process; the tests then only read the results.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import original_llava
from tiny_llava import make_test_image

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = REPO_ROOT / "extensions" / "llava" / "cli.py"
NEW_TOKENS = 8
# Two runs at a time fill a 2-core machine: a run is mostly the single-threaded transformers import.
PARALLEL_RUNS = int(os.environ.get("LLAVA_TEST_CLI_WORKERS", "2"))
RUN_TIMEOUT_S = 300

QUESTION = "What is in this picture?"
IMAGE_SIZES = {"a": (70, 45), "b": (45, 90)}

# Raw-prompt runs: format -> (prompt, images). Each format once; the image at the start, in the middle,
# at the end, and two images (two --image flags).
RAW_CASES = {
    "v0": ("<image>\nWhat is in this picture?", ["a"]),
    "v15": ("Look at this picture <image> and tell me what it is.", ["b"]),
    "hf": ("What is this image about?\n<image>", ["a"]),
    "hf5": ("<image> first, then <image> second: which is brighter?", ["a", "b"]),
}
# Templated runs (no --raw): format -> images; the question has no <image>, the CLI places them.
TEMPLATED_CASES = {"v0": ["a"], "v15": ["a", "b"], "hf": ["b"], "hf5": ["a", "b"]}


@dataclass
class CliRun:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return f"cli.py {' '.join(self.args)}\nrc={self.returncode}\nstdout={self.stdout!r}\nstderr:\n{self.stderr}"


def _run_cli(args: list[str], env: dict[str, str]) -> CliRun:
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, str(CLI), *args], cwd=REPO_ROOT, env=env, capture_output=True, timeout=RUN_TIMEOUT_S,
    )
    seconds = time.perf_counter() - started
    return CliRun(
        args, completed.returncode, completed.stdout.decode("utf-8"), completed.stderr.decode("utf-8"), seconds
    )


def image_args(keys, files) -> list[str]:
    """``--image PATH`` for each key of ``files``, in order."""
    return [arg for key in keys for arg in ("--image", str(files[key]))]


def cli_args(model: Path, keys, files, raw_prompt: str | None, *, question: str, new_tokens: int) -> list[str]:
    """A run with the images ``keys``: ``raw_prompt`` with ``--raw``, or (``None``) ``question`` templated."""
    prompt = ["--prompt", raw_prompt, "--raw"] if raw_prompt else ["--prompt", question]
    return ["--model", str(model), "--max-new-tokens", str(new_tokens), *image_args(keys, files), *prompt]


def write_image_files(root: Path, images: dict) -> dict[str, Path]:
    """key -> PNG path for each PIL image of ``images``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, image in images.items():
        paths[key] = root / f"{key}.png"
        image.save(paths[key])
    return paths


@contextlib.contextmanager
def cli_runs_started(runs: dict[str, list[str]], hf_home: Path):
    """Start every run (name -> CLI arguments), PARALLEL_RUNS at a time; yields name -> Future[CliRun] and
    waits for them all on exit."""
    env = dict(os.environ)
    # Offline with an empty cache: nothing may come from (or go to) a hub. UTF-8 pipes: the tiny model's
    # replies contain U+FFFD from byte-fallback tokens.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hf_home), PYTHONIOENCODING="utf-8")
    env.pop("HF_HUB_CACHE", None)
    with ThreadPoolExecutor(max_workers=PARALLEL_RUNS) as pool:
        yield {name: pool.submit(_run_cli, args, env) for name, args in runs.items()}


def _write_plain_llama(folder: Path, tokenizer_source: Path) -> Path:
    """A tiny ordinary Llama checkpoint (no LLaVA fields): what the CLI must refuse."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=800, max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoints) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_inputs")
    paths = write_image_files(root, {key: make_test_image(width, height, seed=width * 1000 + height)
                                     for key, (width, height) in IMAGE_SIZES.items()})
    paths["bad"] = root / "not_really.png"
    paths["bad"].write_bytes(b"these bytes are not an image\n" * 4)
    paths["missing_image"] = root / "no_such_picture.png"
    paths["missing_model"] = root / "no_such_model_dir"
    paths["plain_llama"] = _write_plain_llama(root / "plain_llama", tiny_checkpoints.v15)
    paths["hf_home"] = root / "empty_hf_home"
    paths["hf_home"].mkdir()
    return paths


@pytest.fixture(scope="module")
def cli_runs(tiny_checkpoints, files):
    """name -> Future[CliRun]; every run is started here, PARALLEL_RUNS at a time."""
    runs: dict[str, list[str]] = {}
    for fmt, (prompt, images) in RAW_CASES.items():
        runs[f"raw-{fmt}"] = cli_args(getattr(tiny_checkpoints, fmt), images, files, prompt, question=QUESTION,
                                      new_tokens=NEW_TOKENS)
    for fmt, images in TEMPLATED_CASES.items():
        runs[f"templated-{fmt}"] = cli_args(getattr(tiny_checkpoints, fmt), images, files, None, question=QUESTION,
                                            new_tokens=NEW_TOKENS)
    hf = str(tiny_checkpoints.hf)
    runs["missing-image"] = ["--model", hf, "--image", str(files["missing_image"]), "--prompt", "<image> hi", "--raw"]
    runs["bad-image"] = ["--model", hf, "--image", str(files["bad"]), "--prompt", "<image> hi", "--raw"]
    runs["plain-llama"] = ["--model", str(files["plain_llama"]), *image_args(["a"], files), "--prompt", "hi"]
    runs["missing-model-dir"] = ["--model", str(files["missing_model"]), *image_args(["a"], files), "--prompt", "hi"]
    runs["missing-hub-model"] = ["--model", "no-such-org/no-such-llava", *image_args(["a"], files), "--prompt", "hi"]
    runs["marker-count"] = ["--model", str(tiny_checkpoints.v15), *image_args(["a"], files),
                            "--prompt", "<image> and <image>", "--raw"]
    runs["bad-dtype"] = ["--model", hf, *image_args(["a"], files), "--prompt", "hi", "--dtype", "float8"]
    runs["load-in-4bit"] = ["--model", hf, *image_args(["a"], files), "--prompt", QUESTION, "--load-in-4bit",
                            "--max-new-tokens", str(NEW_TOKENS)]

    with cli_runs_started(runs, files["hf_home"]) as futures:
        yield futures


# ---------------------------------------------------------------------------------------------------------
# The transformers reference


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    models = {
        name: LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        for name, path in (("gelu", tiny_checkpoints.hf_reference), ("linear", tiny_checkpoints.hf_linear_reference))
    }
    tokenizers = {fmt: AutoTokenizer.from_pretrained(str(getattr(tiny_checkpoints, fmt))) for fmt in RAW_CASES}
    return models, tokenizers


def _pixel_processor(tiny, pad: bool):
    from transformers import LlavaImageProcessorPil

    size = tiny.image_size
    return LlavaImageProcessorPil(
        do_pad=pad, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(tiny.image_mean), image_std=list(tiny.image_std), resample=3, do_center_crop=True,
    )


def _original_v1_ids(tokenizer, prompt: str, image_token_id: int, n: int) -> list[int]:
    """LLaVA's `tokenizer_image_token` (chunks tokenized separately, one BOS), slots expanded to n ids."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split("<image>")]
    ids = [tokenizer.bos_token_id]
    for index, chunk in enumerate(chunks):
        if index:
            ids += [image_token_id] * n
        ids += chunk[1:] if chunk and chunk[0] == tokenizer.bos_token_id else chunk
    return ids


def reference_reply(tiny, references, fmt: str, prompt: str, images) -> str:
    """What `LlavaForConditionalGeneration` answers greedily, as the CLI should print it."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    models, tokenizers = references
    tokenizer = tokenizers[fmt]
    n = tiny.tokens_per_image
    if fmt in ("hf", "hf5"):
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil.from_pretrained(str(getattr(tiny, fmt))), tokenizer=tokenizer,
            patch_size=tiny.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        )
        inputs = processor(images=images, text=prompt, return_tensors="pt")
        input_ids, pixels, model, vocab = inputs["input_ids"], inputs["pixel_values"], models["gelu"], tiny.padded_vocab
    elif fmt == "v15":
        input_ids = torch.tensor([_original_v1_ids(tokenizer, prompt, tiny.image_token_id, n)])
        pixels = _pixel_processor(tiny, pad=True)(images, return_tensors="pt")["pixel_values"]
        model, vocab = models["gelu"], tiny.base_vocab
    else:
        spelled = prompt.replace("<image>", "<im_start>" + "<im_patch>" * n + "<im_end>")
        input_ids = torch.tensor([tokenizer(spelled)["input_ids"]])
        pixels = _pixel_processor(tiny, pad=False)(images, return_tensors="pt")["pixel_values"]
        model, vocab = models["linear"], tiny.v0_vocab
    # Rows past the format's own vocabulary exist only in the reference's padded embedding table.
    suppress = list(range(vocab, model.config.text_config.vocab_size)) or None
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=suppress, pad_token_id=0,
        )
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def _open_images(keys):
    return [make_test_image(*IMAGE_SIZES[key], seed=IMAGE_SIZES[key][0] * 1000 + IMAGE_SIZES[key][1]) for key in keys]


def _templated_prompt(tiny, fmt: str, images: int) -> str:
    """The prompt the CLI should build without --raw: the original templates for v0/v1.5 (images after the
    question for v0, before it for v1), the checkpoint's own chat template for llava-hf."""
    if fmt in ("v0", "v15"):  # original LLaVA's get_prompt (tests/original_llava.py)
        return original_llava.prompt_for("llava_v0" if fmt == "v0" else "llava_v1", [(QUESTION, images, None)])
    from transformers import LlavaProcessor

    # hf keeps its template in chat_template.json, hf5 in chat_template.jinja; the processor reads both.
    processor = LlavaProcessor.from_pretrained(str(getattr(tiny, fmt)))
    content = [{"type": "image"}] * images + [{"type": "text", "text": QUESTION}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def _assert_answer(run: CliRun, expected: str) -> None:
    assert run.returncode == 0, run.describe()
    assert expected, "the reference produced an empty reply; the comparison would prove nothing"
    assert run.stdout == expected + "\n", run.describe()
    # Logs go to stderr (and only there).
    assert re.search(r"Generated \d+ tokens", run.stderr), run.describe()
    assert "Traceback" not in run.stderr, run.describe()


# ---------------------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize("fmt", list(RAW_CASES))
def test_raw_prompt_reply_equals_transformers_reference(fmt, tiny_checkpoints, references, cli_runs):
    prompt, image_keys = RAW_CASES[fmt]
    expected = reference_reply(tiny_checkpoints, references, fmt, prompt, _open_images(image_keys))
    _assert_answer(cli_runs[f"raw-{fmt}"].result(), expected)


@pytest.mark.parametrize("fmt", list(TEMPLATED_CASES))
def test_templated_prompt_reply_equals_transformers_reference(fmt, tiny_checkpoints, references, cli_runs):
    image_keys = TEMPLATED_CASES[fmt]
    prompt = _templated_prompt(tiny_checkpoints, fmt, len(image_keys))
    assert prompt.count("<image>") == len(image_keys) and QUESTION in prompt
    expected = reference_reply(tiny_checkpoints, references, fmt, prompt, _open_images(image_keys))
    _assert_answer(cli_runs[f"templated-{fmt}"].result(), expected)


def test_template_changes_the_reply(tiny_checkpoints, references, cli_runs):
    """Guards the templated test: the v1.5 template must matter, or it could be silently skipped."""
    run = cli_runs["templated-v15"].result()
    bare = reference_reply(tiny_checkpoints, references, "v15", "<image><image>\n" + QUESTION, _open_images(["a", "b"]))
    assert run.returncode == 0, run.describe()
    assert run.stdout.strip() != bare


def test_wall_time_per_format(cli_runs, record_property):
    """Reports the CLI wall time per format (tiny models: the transformers import dominates)."""
    timings = {}
    for fmt in RAW_CASES:
        run = cli_runs[f"raw-{fmt}"].result()
        timings[fmt] = round(run.seconds, 2)
        record_property(f"cli_wall_s_{fmt}", timings[fmt])
    print(f"\nCLI wall time per format ({PARALLEL_RUNS} runs in parallel): {timings}")
    assert all(0 < seconds < RUN_TIMEOUT_S for seconds in timings.values()), timings


# ---------------------------------------------------------------------------------------------------------
# Errors: non-zero exit, one `error:` line on stderr naming the culprit, nothing on stdout


def _assert_one_error_line(run: CliRun, *culprits: str) -> str:
    assert run.returncode != 0, run.describe()
    assert run.stdout == "", run.describe()
    assert "Traceback" not in run.stderr, run.describe()
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.describe()
    for culprit in culprits:
        assert culprit in lines[0], run.describe()
    return lines[0]


def test_missing_image_file(cli_runs, files):
    line = _assert_one_error_line(cli_runs["missing-image"].result(), str(files["missing_image"]))
    assert "no such file" in line


def test_undecodable_image(cli_runs, files):
    line = _assert_one_error_line(cli_runs["bad-image"].result(), str(files["bad"]), "image 1")
    assert re.search(r"not a recogni[sz]ed image", line), line


def test_plain_llama_folder_is_not_llava(cli_runs, files):
    line = _assert_one_error_line(cli_runs["plain-llama"].result(), str(files["plain_llama"]))
    assert "not a LLaVA checkpoint" in line


@pytest.mark.parametrize("run_name, model", [("missing-model-dir", None), ("missing-hub-model", "no-such-org/no-such-llava")])
def test_missing_model_offline(run_name, model, cli_runs, files):
    model = model or str(files["missing_model"])
    line = _assert_one_error_line(cli_runs[run_name].result(), model)
    assert "no such folder" in line


def test_raw_marker_count_mismatch_names_both_numbers(cli_runs):
    line = _assert_one_error_line(cli_runs["marker-count"].result(), "<image>")
    assert re.search(r"\b2 <image> marker\(s\) but 1 image\(s\)", line), line


def test_unknown_dtype_is_a_usage_error(cli_runs):
    run = cli_runs["bad-dtype"].result()
    assert run.returncode == 2, run.describe()
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    assert re.search(r"error: argument --dtype: invalid choice: 'float8'", run.stderr), run.describe()


def test_load_in_4bit(cli_runs):
    """A 4-bit language model (bitsandbytes' CPU backend here) answers; without bitsandbytes, one error line
    that names the package."""
    import importlib.util

    run = cli_runs["load-in-4bit"].result()
    if importlib.util.find_spec("bitsandbytes") is None:
        _assert_one_error_line(run, "--load-in-4bit", "bitsandbytes")
        return
    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.stderr and "error:" not in run.stderr, run.describe()
    assert "(hf format, 4-bit)" in run.stderr and "1 image(s)" in run.stderr, run.describe()
