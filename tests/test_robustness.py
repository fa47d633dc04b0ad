"""Robustness of extensions/llava: bad and odd images everywhere, limits, memory, faults, concurrency, security.

Every image of the generated corpus (tests/bad_images.py) goes through the CLI and through the webui
stand-in (UI attachment and OpenAI API data URL). Bad images must be refused with one clear message naming
the image, without losing anything the user sent; odd but valid images must reach the model as the
pipeline encodes them. Then: size and count limits, flat memory over 200 requests, vision faults (missing
or corrupt tower, mismatched projector, out of memory, model unload/switch, Stop), two concurrent clients,
and what the code may never do (unsafe torch.load, remote code, opening paths or URLs from a request).
"""

from __future__ import annotations

import ast
import base64
import builtins
import copy
import gc
import html
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

import bad_images
from bad_images import Case, corpus
from llava_cache import EmbeddingCache
from llava_image_io import ImageError, load_image
from llava_pipeline import LlavaPipeline
from tiny_llava import make_test_image
from webui_harness import WebuiHarness, image_part, text_part
from webui_llava_support import Loaded

from modules import chat, shared  # noqa: E402 - the stand-in, put on sys.path by webui_harness
from modules import models as webui_models  # noqa: E402
from modules.api import completions as api  # noqa: E402
from modules.api.errors import InvalidRequestError  # noqa: E402
from modules.chat import IMAGE_MIME_TYPES  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EXTENSION_DIR = REPO_ROOT / "extensions" / "llava"
CLI = EXTENSION_DIR / "cli.py"
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # PIL, on corrupt-tiff
NOTICE = "> ⚠️ llava: "
QUESTION = "Please describe the attached picture in a few words."


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny shapes: with two intra-op threads on a busy 2-core machine, thread hand-off costs 10x the work.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Model(Loaded):
    """A tiny checkpoint's language model and tokenizer, and an independent reference pipeline."""

    def features(self, image) -> torch.Tensor:
        """``[N, H]``: the reference encoding of one image (decoded like the extension does)."""
        if not isinstance(image, Image.Image):
            image = load_image(image, name="reference")
        return super().features(image)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    cache = {}

    def get(fmt: str) -> Model:
        if fmt not in cache:
            cache[fmt] = Model(getattr(tiny_checkpoints, fmt))
        return cache[fmt]

    return get


@pytest.fixture
def make_harness(models):
    """``make_harness(fmt, settings, model_name=..., model=..., args=...)``; one live harness at a time."""
    made = []

    def make(fmt: str = "hf", settings: dict | None = None, *, model: Model | None = None,
             model_name: str | None = None, args: dict | None = None) -> WebuiHarness:
        for harness in made:
            harness.close()
        entry = model or models(fmt)
        folder = entry.folder
        harness = WebuiHarness(
            EXTENSION_DIR, entry.model, entry.tokenizer, {"mode": "instruct", "max_new_tokens": 2, **(settings or {})},
            args={"model_dir": str(folder.parent), "cpu": True, **(args or {})}, model_name=model_name or folder.name,
        )
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


# ---------------------------------------------------------------------------------------------- helpers


def visible(harness) -> str:
    return harness.history["visible"][-1][1]


# The informational notice of "embed all" off: a new image message leaves the previous one's images out.
LEFT_OUT = "(from an earlier message)"


def problem_notices(text: str) -> list[str]:
    """The notices above a reply, but for the informational one about images left out by the rule."""
    return [line for line in text.split("\n") if line.startswith(NOTICE) and LEFT_OUT not in line]


def image_rows(input_ids, inputs_embeds, model: Model) -> list[int]:
    """Positions whose embedding is not the plain embedding of their id: where an image was spliced in
    (found without assuming which placeholder id the pipeline writes)."""
    if inputs_embeds is None:
        return []
    with torch.no_grad():
        plain = model.model.get_input_embeddings()(input_ids.to(torch.long))
    return (inputs_embeds != plain).any(dim=-1)[0].nonzero().flatten().tolist()


def assert_images_reached_generate(call, model: Model, images) -> None:
    """``generate`` got exactly these images, in order, each as one contiguous run of rows equal to the
    reference pipeline's encoding, and plain token embeddings everywhere else."""
    assert call.inputs_embeds is not None, "no image embeddings reached generate"
    assert call.input_ids.shape[1] == call.inputs_embeds.shape[1]
    assert_embedded(call.input_ids, call.inputs_embeds, model, images)


def assert_embedded(input_ids, inputs_embeds, model: Model, images) -> None:
    rows = image_rows(input_ids, inputs_embeds, model)
    expected = [model.features(image) for image in images]
    assert len(rows) == sum(f.shape[0] for f in expected), (len(rows), [f.shape[0] for f in expected])
    start = 0
    for feature in expected:
        run = rows[start:start + feature.shape[0]]
        assert run == list(range(run[0], run[0] + len(run))), "an image's rows are not contiguous"
        torch.testing.assert_close(inputs_embeds[0, run], feature, rtol=0, atol=0)
        start += feature.shape[0]


def assert_text_only(call, model: Model) -> None:
    assert not image_rows(call.input_ids, call.inputs_embeds, model)


def last_tokenizer_prompt(harness) -> str:
    return [c for c in harness.hook_calls if c.name == "tokenizer_modifier"][-1].args[1]


def assert_last_request_embedded(harness, model: Model, images) -> None:
    """What the last tokenizer_modifier returned (webui passes it to generate unchanged); for models
    loaded after the harness, whose generate calls the harness does not record."""
    _, input_ids, inputs_embeds = [c for c in harness.hook_calls if c.name == "tokenizer_modifier"][-1].result
    assert inputs_embeds is not None and input_ids.shape[1] == inputs_embeds.shape[1]
    assert_embedded(input_ids, inputs_embeds, model, images)


def ui_data_url(case: Case) -> str:
    """What webui stores for an uploaded file: its bytes with the MIME type of its suffix."""
    mime = IMAGE_MIME_TYPES[Path(case.ui_filename).suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(case.data).decode('ascii')}"


def good_image(seed: int = 99):
    return make_test_image(33, 27, seed=seed)


def collect_failures(cases, check) -> list[str]:
    failures = []
    for case in cases:
        try:
            check(case)
        except AssertionError as error:
            failures.append(f"{case.id}: {error}".splitlines()[0][:400])
    return failures


# ---------------------------------------------------------------------------------------------- CLI runs


def _run_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(CLI), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=str(REPO_ROOT))


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_images")
    paths = {}
    for case in corpus():
        if case.has_file:
            path = root / case.id / case.filename
            path.parent.mkdir()
            path.write_bytes(case.data)
            paths[case.id] = path
    return paths


@pytest.fixture(scope="module")
def cli_subprocesses(tiny_checkpoints, corpus_files):
    """Two real CLI runs started early (each pays ~3 s of imports), read by the last tests of this file:
    every valid corpus file at once, and a decompression bomb."""
    valid = [case for case in bad_images.valid_cases() if case.has_file]
    images = [arg for case in valid for arg in ("--image", str(corpus_files[case.id]))]
    runs = {
        "valid": _run_cli(["--model", str(tiny_checkpoints.hf), "--max-new-tokens", "3", *images,
                           "--prompt", "What do these pictures show?"]),
        "bomb-gif": _run_cli(["--model", str(tiny_checkpoints.hf), "--image", str(corpus_files["bomb-gif"]),
                              "--prompt", "What is it?"]),
    }
    results = {}

    def result(name: str):
        if name not in results:
            stdout, stderr = runs[name].communicate(timeout=300)
            results[name] = (runs[name].returncode, stdout, stderr)
        return results[name]

    yield result
    for process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


# ---------------------------------------------------------------------------------------------- 1. corpus


def test_corpus_covers_every_required_kind(cli_subprocesses):
    cases = corpus()
    ids = {case.id for case in cases}
    assert len(cases) >= 40 and len(ids) == len(cases)
    for fmt in ("png", "jpeg", "gif", "webp", "bmp", "tiff"):
        assert {f"truncated-{fmt}", f"corrupt-{fmt}"} <= ids
    required = {
        "zero-bytes", "text-bytes", "mime-text-plain", "mime-application-pdf", "mime-disagrees-with-bytes",
        "invalid-base64", "bomb-png", "bomb-bmp", "bomb-gif", "size-1x1", "size-1x20000", "size-20000x1",
        "png-16bit-gradient", "animated-gif", "animated-webp", "animated-apng", "multi-page-tiff", "svg-file",
        "svg-data-url",
    }
    required |= {f"mode-{mode}" for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr")}
    required |= {f"exif-orientation-{n}" for n in range(1, 9)}
    assert required <= ids, required - ids
    # The generated files really are what their names say.
    assert Image.open(io.BytesIO(next(c for c in cases if c.id == "mode-CMYK").data)).mode == "CMYK"
    assert Image.open(io.BytesIO(next(c for c in cases if c.id == "png-16bit-gradient").data)).mode.startswith("I")
    assert getattr(Image.open(io.BytesIO(next(c for c in cases if c.id == "animated-apng").data)), "n_frames") == 3
    assert Image.open(io.BytesIO(next(c for c in cases if c.id == "exif-orientation-6").data)).getexif()[0x0112] == 6


def test_decoder_contract_over_the_corpus():
    def check(case: Case):
        for source in ([case.data] if case.has_file else []) + [case.url]:
            if case.valid:
                decoded = load_image(source, name=case.filename)
                assert decoded.mode == "RGB" and decoded.size == case.size
            else:
                with pytest.raises(ImageError) as error:
                    load_image(source, name=case.filename)
                assert str(error.value).startswith(f"{case.filename}: ")
                assert re.search(case.reason, error.value.reason), error.value.reason

    assert not (failures := collect_failures(corpus(), check)), "\n".join(failures)


def test_cli_in_process_refuses_every_bad_file_with_one_line(tiny_checkpoints, corpus_files, capsys, monkeypatch):
    import cli

    # In-process, pytest owns the root logger; the real runs below check that nothing else reaches stderr.
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)

    def check(case: Case):
        path = corpus_files[case.id]
        code = cli.main(["--model", str(tiny_checkpoints.hf), "--image", str(path), "--prompt", "What is it?"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", (code, out)
        assert err.endswith("\n") and err.count("\n") == 1, err
        assert err.startswith(f"error: image 1 ({path}): "), err
        assert re.search(case.reason, err) and "Traceback" not in err, err

    cases = [case for case in bad_images.bad_cases() if case.has_file]
    assert len(cases) >= 25
    assert not (failures := collect_failures(cases, check)), "\n".join(failures)


def test_cli_in_process_answers_with_every_valid_file(tiny_checkpoints, corpus_files, capsys, monkeypatch):
    import cli

    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    encoded = []
    original = LlavaPipeline.encode_images

    def spy(self, images, *args, **kwargs):
        encoded.extend(image.size for image in images)
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(LlavaPipeline, "encode_images", spy)
    valid = [case for case in bad_images.valid_cases() if case.has_file]
    images = [arg for case in valid for arg in ("--image", str(corpus_files[case.id]))]
    code = cli.main(["--model", str(tiny_checkpoints.hf), "--max-new-tokens", "2", *images, "--prompt", "Compare."])
    out, err = capsys.readouterr()
    assert code == 0 and "error:" not in err and "Traceback" not in err, err  # stderr: progress and logs only
    assert out.endswith("\n") and out.count("\n") == 1
    assert sorted(encoded) == sorted(case.size for case in valid)


def _paired(bad: list[Case], valid: list[Case]) -> list[tuple[Case, Case | None]]:
    """Each bad case followed by a valid one (the "next turn" after a refusal); left-over valid cases alone."""
    pairs = [(case, valid[i % len(valid)]) for i, case in enumerate(bad)]
    pairs += [(case, None) for case in valid[len(bad):]]
    return pairs


def test_ui_attachment_for_every_corpus_file(make_harness, models):
    """Bad: the text is answered, a notice names the image, history keeps text and attachment, and the
    next turn (a valid corpus image) works. Valid: the image reaches generate exactly as the pipeline
    encodes it."""
    harness = make_harness("hf")
    model = models("hf")

    def send_and_check(case: Case):
        calls = len(harness.generate_calls)
        harness.send(QUESTION, [(case.ui_filename, case.data)])
        assert len(harness.generate_calls) == calls + 1, "the message was not answered"
        call = harness.generate_calls[-1]
        assert QUESTION in last_tokenizer_prompt(harness)
        if case.valid:
            assert NOTICE not in visible(harness)
            assert_images_reached_generate(call, model, [case.data])
            return
        notice = visible(harness).split("\n\n")[0]
        assert notice.startswith(NOTICE + html.escape(case.ui_filename, quote=False) + ": "), notice
        assert re.search(case.reason, notice), notice
        assert_text_only(call, model)

    def sent(case: Case) -> list[dict]:
        return [{"name": case.ui_filename, "type": "image", "image_data": ui_data_url(case), "image_id": 1}]

    failures = []
    bad = [case for case in bad_images.bad_cases() if case.has_file]
    valid = [case for case in bad_images.valid_cases() if case.has_file]
    for first, then in _paired(bad, valid):
        harness.new_chat()
        try:
            send_and_check(first)
            if then is not None:
                send_and_check(then)
            # Nothing the user sent was lost: every message as sent, with its attachment.
            for row, case in enumerate([first] + ([then] if then else [])):
                assert harness.history["internal"][row][0] == QUESTION
                assert harness.history["metadata"][f"user_{row}"]["attachments"] == sent(case)
        except AssertionError as error:
            failures.append(f"{first.id} then {then.id if then else '-'}: {error}".splitlines()[0][:400])
    assert not failures, "\n".join(failures)


def test_api_data_url_for_every_corpus_case(make_harness, models):
    """Bad: HTTP 400 (InvalidRequestError) naming the image and the reason, and the server keeps working
    (the next request, a valid corpus image, is answered). Valid: the image reaches generate as the
    pipeline encodes it."""
    harness = make_harness("hf")
    model = models("hf")

    def request_and_check(case: Case):
        messages = [{"role": "user", "content": [text_part(QUESTION), image_part(case.url)]}]
        calls = len(harness.generate_calls)
        if case.valid:
            harness.api_chat(messages)
            assert len(harness.generate_calls) == calls + 1
            assert_images_reached_generate(harness.generate_calls[-1], model, [case.url])
            return
        with pytest.raises(InvalidRequestError) as error:
            harness.api_chat(messages)
        assert error.value.code == 400 and error.value.param == "messages"
        assert error.value.message.startswith("image 1 of a message: "), error.value.message
        assert re.search(case.reason, error.value.message), error.value.message
        assert len(harness.generate_calls) == calls, "a refused request must not generate"

    failures = []
    for first, then in _paired(bad_images.bad_cases(), bad_images.valid_cases()):
        try:
            request_and_check(first)
            if then is not None:
                request_and_check(then)
        except AssertionError as error:
            failures.append(f"{first.id} then {then.id if then else '-'}: {error}".splitlines()[0][:400])
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------- 2. limits


def test_max_image_pixels_setting(make_harness, models):
    harness = make_harness("hf", {"llava-max_image_pixels": 1000})
    model = models("hf")
    small, big = make_test_image(30, 30, seed=1), make_test_image(40, 30, seed=2)  # 900 and 1200 pixels
    harness.send(QUESTION, [("big.png", bad_images.encode(big, "PNG"))])
    notice = visible(harness).split("\n\n")[0]
    assert notice.startswith(NOTICE + "big.png: ") and "40x30" in notice and "1000 pixels" in notice, notice
    assert_text_only(harness.generate_calls[-1], model)
    harness.send("This one is small.", [small])
    assert_images_reached_generate(harness.generate_calls[-1], model, [small])
    with pytest.raises(InvalidRequestError) as error:
        harness.api_chat([{"role": "user", "content": [text_part(QUESTION), image_part(big)]}])
    assert "1000 pixels" in error.value.message and error.value.code == 400
    harness.api_chat([{"role": "user", "content": [text_part(QUESTION), image_part(small)]}])
    assert_images_reached_generate(harness.generate_calls[-1], model, [small])


def test_max_images_per_request_setting(make_harness, models):
    harness = make_harness("hf", {"llava-max_images_per_request": 2, "llava-add_all_images_to_prompt": True})
    model = models("hf")
    pictures = [make_test_image(30 + i, 30, seed=i) for i in range(3)]
    harness.send(QUESTION, pictures)
    notice = visible(harness).split("\n\n")[0]
    assert notice.startswith(NOTICE) and "llava-max_images_per_request" in notice and "limit of 2" in notice
    assert_images_reached_generate(harness.generate_calls[-1], model, pictures[1:])  # the most recent ones
    with pytest.raises(InvalidRequestError) as error:
        harness.api_chat([{"role": "user", "content": [text_part(QUESTION), *map(image_part, pictures)]}])
    assert "llava-max_images_per_request" in error.value.message and error.value.code == 400
    harness.api_chat([{"role": "user", "content": [text_part(QUESTION), *map(image_part, pictures[:2])]}])
    assert_images_reached_generate(harness.generate_calls[-1], model, pictures[:2])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _answer_at_once(**generate_params):
    """Stands in for the language model's generate: EOS right away, through webui's stopping criteria
    (its streaming wrapper reads tokens from them)."""
    inputs = generate_params["inputs"]
    sequence = torch.cat([inputs, torch.tensor([[shared.tokenizer.eos_token_id]], device=inputs.device)], dim=1)
    for criterion in generate_params.get("stopping_criteria", []):
        criterion(sequence, None)
    return sequence


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_stays_flat_over_200_requests_with_distinct_images(make_harness):
    """200 API requests, each with a new image, through every extension hook in webui's order. The
    language model's own forward pass is replaced (it is not the extension's memory, and it would
    double the run time)."""
    cache_mb = 0.05  # 51 KB: room for 12 tiny embeddings (16 x 64 float32 = 4 KB each)
    harness = make_harness("hf", {"llava-cache_mb": cache_mb})
    cache = harness.extension._vision.current().cache
    budget = int(cache_mb * 1024 * 1024)
    entry_bytes = 16 * 64 * 4
    rng = random.Random(0)
    samples = []
    recorder = harness.model.generate
    harness.model.generate = _answer_at_once
    try:
        for request in range(200):
            picture = Image.frombytes("RGB", (12, 10), rng.randbytes(12 * 10 * 3))
            harness.api_chat([{"role": "user", "content": [text_part("What is this?"), image_part(picture)]}],
                             max_tokens=1)
            _, _, inputs_embeds = [c for c in harness.hook_calls if c.name == "tokenizer_modifier"][-1].result
            assert inputs_embeds is not None
            assert cache.bytes_used <= budget and len(cache) <= budget // entry_bytes
            harness.hook_calls.clear()  # the stand-in's own records are not the extension's memory
            if request >= 49 and request % 25 == 24:
                gc.collect()
                samples.append(_rss_bytes())
                if request == 49:
                    live_after_warm_up = _live_objects()
    finally:
        harness.model.generate = recorder
    assert len(cache) == budget // entry_bytes and cache.bytes_used == len(cache) * entry_bytes
    assert len(harness.extension._sizes) <= harness.extension._MAX_SIZE_ENTRIES
    growth = max(samples) - samples[0]
    assert growth < 50 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MB over the last 150 requests"
    # Finer than RSS: no decoded image or tensor of a finished request stays alive.
    live = _live_objects()
    for kind, count in live.items():
        assert count - live_after_warm_up[kind] <= 5, (kind, live_after_warm_up[kind], count)


def _live_objects() -> dict[str, int]:
    gc.collect()
    counts = {"PIL images": 0, "tensors": 0}
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance(): that reads __class__, which some lazy module proxies warn about
        if issubclass(kind, Image.Image):
            counts["PIL images"] += 1
        elif issubclass(kind, torch.Tensor):
            counts["tensors"] += 1
    return counts


@pytest.mark.parametrize("pad", [False, True], ids=["crop", "pad"])
def test_extreme_aspect_ratios_preprocess_quickly(pad):
    """A 1x20000 PNG is tiny, but resizing its short side to 336 makes it 336 x 6.7 M pixels (the
    reference's full resize: ~100 s and ~20 GB), and padding it to a square makes 400 M pixels. Only the
    kept window is computed; an image whose padded square would exceed 16384² is shrunk before padding."""
    import numpy as np

    import llava_preprocess

    config = llava_preprocess.PreprocessConfig.from_processor_dict(
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}, pad_to_square=pad)
    rng = np.random.default_rng(0)
    for width, height in ((1, 20_000), (20_000, 1), (3, 100_000), (100_000, 2)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        started = time.perf_counter()
        pixels = llava_preprocess.preprocess(image, config)
        assert time.perf_counter() - started < 5, (width, height)
        assert pixels.shape == (3, 336, 336) and torch.isfinite(pixels).all()
    if pad:
        return
    # The windowed resize is the full resize up to rounding (the only difference: sample positions are
    # computed relative to the window).
    image = Image.fromarray(rng.integers(0, 256, (20_000, 3, 3), dtype=np.uint8))
    small = llava_preprocess.PreprocessConfig.from_processor_dict(
        {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}, pad_to_square=False)
    full_size = (56, 56 * 20_000 // 3)
    assert full_size[0] * full_size[1] > llava_preprocess._FULL_RESIZE_MAX_PIXELS  # the windowed path
    resized = np.asarray(image.resize(full_size, Image.Resampling.BICUBIC)).astype(int)
    top = (resized.shape[0] - 56) // 2
    window = llava_preprocess._resize_and_crop_uint8(image, small).astype(int)
    assert np.abs(window - resized[top:top + 56]).max() <= 1


# ---------------------------------------------------------------------------------------------- 4. faults


def _copy_checkpoint(source: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _assert_text_chat_works(harness, model: Model) -> None:
    harness.new_chat()
    calls = len(harness.generate_calls)
    harness.send("Just text, please.")
    assert len(harness.generate_calls) == calls + 1
    assert_text_only(harness.generate_calls[-1], model)
    assert NOTICE not in visible(harness)


def test_missing_vision_tower_says_what_to_download(make_harness, models, tiny_checkpoints, tmp_path):
    folder = _copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15-missing-tower",
                              mm_vision_tower="llava-test-org/clip-vit-not-downloaded")
    harness = make_harness("v15", model_name=folder.name, args={"model_dir": str(tmp_path)})
    status = harness.extension._vision.status
    assert "hf download llava-test-org/clip-vit-not-downloaded" in status, status
    harness.send(QUESTION, [good_image()])
    notice = visible(harness).split("\n\n")[0]
    assert notice.startswith(NOTICE) and "llava-test-org/clip-vit-not-downloaded" in notice, notice
    assert_text_only(harness.generate_calls[-1], models("v15"))
    _assert_text_chat_works(harness, models("v15"))


@pytest.mark.parametrize("damaged", ["tower safetensors", "projector shard"])
def test_unreadable_vision_weights_name_the_file(damaged, make_harness, models, tiny_checkpoints, tmp_path):
    if damaged == "tower safetensors":
        tower = tmp_path / "clip-corrupt"
        shutil.copytree(tiny_checkpoints.clip, tower)
        broken = tower / "model.safetensors"
        broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
        harness = make_harness("v15", {"llava-vision_tower": str(tower)})
    else:
        folder = _copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15-damaged")
        weight_map = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
        broken = folder / next(file for key, file in weight_map.items() if key.startswith("model.mm_projector."))
        broken.write_bytes(broken.read_bytes()[:1000])  # an interrupted download
        harness = make_harness("v15", model_name=folder.name, args={"model_dir": str(tmp_path)})
    status = harness.extension._vision.status
    assert "could not be loaded" in status and f"cannot read the weights file {broken}" in status, status
    harness.send(QUESTION, [good_image()])
    assert visible(harness).startswith(NOTICE) and str(broken) in visible(harness)
    assert_text_only(harness.generate_calls[-1], models("v15"))
    _assert_text_chat_works(harness, models("v15"))


def _write_tower(folder: Path, hidden_size: int) -> Path:
    """A random CLIP vision tower of another width, saved like a hub tower folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3,
                              num_attention_heads=4, image_size=56, patch_size=14, projection_dim=hidden_size)
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(folder)
    return folder


def test_projector_that_does_not_fit_the_tower_says_so(make_harness, models, tmp_path):
    tower = _write_tower(tmp_path / "clip-wide", hidden_size=48)
    harness = make_harness("v15", {"llava-vision_tower": str(tower)})
    status = harness.extension._vision.status
    assert "projector input width 32" in status and "vision tower's feature width 48" in status, status
    harness.send(QUESTION, [good_image()])
    assert "projector input width" in visible(harness)
    _assert_text_chat_works(harness, models("v15"))


def test_projector_that_does_not_fit_the_language_model_says_so(make_harness, models, tiny_checkpoints):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=models("v15").tokenizer.vocab_size + 8, hidden_size=48,
                                         intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=1024)).eval()
    stand_in = copy.copy(models("v15"))
    stand_in.model = other
    harness = make_harness("v15", model=stand_in)
    status = harness.extension._vision.status
    assert "projector output width 64" in status and "embedding width 48" in status, status
    harness.send(QUESTION, [good_image()])
    assert "projector output width" in visible(harness)
    _assert_text_chat_works(harness, stand_in)


def test_out_of_memory_while_encoding_is_a_notice_and_the_next_image_works(make_harness, models):
    harness = make_harness("hf")
    model = models("hf")
    tower = harness.extension._vision.current().tower
    failures = []

    def forward_out_of_memory(pixels):
        failures.append(pixels.shape)
        del tower.forward  # once: the next call runs the real forward again
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    tower.forward = forward_out_of_memory
    harness.send(QUESTION, [good_image(1)])
    assert len(failures) == 1
    notice = visible(harness).split("\n\n")[0]
    assert notice.startswith(NOTICE) and "CUDA out of memory" in notice and "answered without them" in notice
    assert_text_only(harness.generate_calls[-1], model)
    harness.send("Try again with this one.", [good_image(2)])
    assert_images_reached_generate(harness.generate_calls[-1], model, [good_image(2)])
    assert not problem_notices(visible(harness))


def test_unload_between_turns_then_reload(make_harness, models):
    harness = make_harness("hf")
    model = models("hf")
    harness.send(QUESTION, [good_image(1)])
    harness.unload_model()
    # webui refuses chat without a model (gr.Error); the extension's own hooks must not fail on their own.
    with pytest.raises(RuntimeError, match="No model is loaded"):
        harness.send("Still there?", [good_image(2)])
    assert harness.extension.custom_tokenized_length(f"USER: {'<__media__>'} hi") is None
    assert harness.extension._vision.pipeline is None
    shared.model, shared.tokenizer = webui_models.load_model(model.folder.name)
    harness.send("Back again?", [good_image(3)])
    assert_last_request_embedded(harness, model, [good_image(3)])
    assert not problem_notices(visible(harness))


def test_idle_unload_reloads_and_images_still_work(make_harness, models, monkeypatch):
    """--idle-timeout: the model is unloaded but keeps its name; webui reloads it lazily inside
    generate_reply, after the chat prompt hook already ran without a model."""
    harness = make_harness("hf", args={"idle_timeout": 1})
    model = models("hf")
    monkeypatch.setattr(webui_models, "load_model", lambda name, loader=None: (model.model, model.tokenizer))
    harness.send(QUESTION, [good_image(1)])
    webui_models.unload_model(keep_model_name=True)
    assert shared.model is None and shared.model_name == model.folder.name
    # The UI's Send checks for a model before anything else (gr.Error); the API goes straight on.
    harness.api_chat([{"role": "user", "content": [text_part(QUESTION), image_part(good_image(4))]}])
    assert shared.model is model.model
    assert_images_reached_generate(harness.generate_calls[-1], model, [good_image(4)])
    # The chat prompt hook ran before the reload: it must not have told the user the model is blind.
    state = [c for c in harness.hook_calls if c.name == "custom_generate_chat_prompt"][-1].args[1]
    assert not state.get("llava_notices"), state.get("llava_notices")


def test_switching_models_mid_chat_uses_the_new_models_vision(make_harness, models):
    harness = make_harness("hf")
    harness.send(QUESTION, [good_image(1)])
    assert_images_reached_generate(harness.generate_calls[-1], models("hf"), [good_image(1)])
    harness.unload_model()
    v15 = models("v15")
    # The Model tab's load (webui's loader, with the LLaVA registration and template of the extension).
    shared.model, shared.tokenizer = webui_models.load_model(v15.folder.name)
    harness.send("And now with another model?", [good_image(2)])
    assert_last_request_embedded(harness, v15, [good_image(2)])
    assert "And now with another model?" in last_tokenizer_prompt(harness)
    assert harness.extension._vision.pipeline.spec.model_dir == v15.folder
    assert not problem_notices(visible(harness))
    assert LEFT_OUT in visible(harness)  # the first message's image is named as left out


def test_stop_pressed_while_encoding(make_harness, models, caplog):
    harness = make_harness("hf")
    model = models("hf")
    pipeline = harness.extension._vision.current()
    fresh_decodes = harness.extension._fresh_decodes
    original_pop = fresh_decodes.pop

    def pop_then_stop(key):  # the splice fetching the picture the prompt hook decoded
        decoded = original_pop(key)
        if threading.current_thread() is threading.main_thread():
            shared.stop_everything = True  # Stop pressed after webui's reset, before the tower runs
        return decoded

    fresh_decodes.pop = pop_then_stop
    with caplog.at_level(logging.INFO):
        harness.send(QUESTION, [good_image(1)])
    del fresh_decodes.pop
    call = harness.generate_calls[-1]
    assert_text_only(call, model)
    assert not any(record.exc_info for record in caplog.records), "a traceback was logged"
    assert any("Stop pressed" in record.getMessage() for record in caplog.records)
    # Stop during the tower's forward pass: the encoding finishes, generation stops at once.
    hook = pipeline.tower.register_forward_hook(lambda *args: setattr(shared, "stop_everything", True))
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            harness.send("Again?", [good_image(2)])
    finally:
        hook.remove()
    assert not any(record.exc_info for record in caplog.records)
    assert_images_reached_generate(harness.generate_calls[-1], model, [good_image(2)])  # encoded, then stopped
    stopped = harness.generate_calls[-1]  # webui's stopping criteria end generate at its first token
    assert stopped.output is None or stopped.output.shape[1] <= stopped.input_ids.shape[1] + 1
    harness.send("Once more, no stop.", [good_image(3)])
    assert_images_reached_generate(harness.generate_calls[-1], model, [good_image(3)])


# ---------------------------------------------------------------------------------------------- 5. concurrency


def test_two_clients_interleaving_never_see_each_others_images(make_harness, models):
    """A UI user (own history, growing) and an API client send 20 requests each from two threads.
    webui serializes generation with shared.generation_lock (taken inside generate_reply, as in webui);
    everything before it (the chat prompt hook, image decoding) runs concurrently."""
    harness = make_harness("hf")
    model = models("hf")
    pictures = {("ui", n): make_test_image(30, 24, seed=100 + n) for n in range(20)}
    pictures.update({("api", n): make_test_image(24, 30, seed=200 + n) for n in range(20)})
    files = {}
    for (client, n), picture in pictures.items():
        path = Path(harness._tmp) / f"{client}{n}.png"
        picture.save(path)
        files[client, n] = str(path)
    start = threading.Barrier(2)
    errors = []

    def ui_client():
        history = {"internal": [], "visible": [], "metadata": {}}
        try:
            start.wait()
            for n in range(20):
                state = harness.ui_state()
                state.update(history=history, unique_id="ui-client")
                for history in chat.generate_chat_reply_wrapper({"text": f"ui request {n}", "files": [files["ui", n]]},
                                                                 state):
                    pass
                time.sleep(random.random() / 200)
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    def api_client():
        try:
            start.wait()
            for n in range(20):
                body = {"messages": [{"role": "user", "content": [text_part(f"api request {n}"),
                                                                   image_part(pictures["api", n])]}],
                        "temperature": 0, "max_tokens": 2}
                api.chat_completions(body)
                time.sleep(random.random() / 200)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=ui_client), threading.Thread(target=api_client)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    calls = [c for c in harness.hook_calls if c.name == "tokenizer_modifier"]
    assert len(calls) == 40 and len(harness.generate_calls) == 40
    threads_seen = {call.thread for call in calls}
    assert len(threads_seen) == 2
    order = []
    for call in calls:
        prompt, (_, ids, embeds) = call.args[1], call.result
        client, n = re.findall(r"(ui|api) request (\d+)", prompt)[-1]
        order.append(client)
        assert_embedded(ids, embeds, model, [pictures[client, int(n)]])
    assert "ui" in order[:20] and "api" in order[:20], "the two clients did not interleave"
    # Every generate call got exactly one tokenizer_modifier result (none mixed up across threads).
    results = {id(call.result[2]) for call in calls}
    assert len(results) == 40


def test_embedding_cache_is_thread_safe():
    entry = torch.zeros(4, 8)  # 128 bytes
    cache = EmbeddingCache(max_bytes=128 * 10)
    errors = []

    def worker(seed: int):
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                key = rng.randrange(40)
                if rng.random() < 0.5:
                    cache.put(key, entry + key)
                else:
                    value = cache.get(key)
                    assert value is None or float(value[0, 0]) == key
                assert 0 <= cache.bytes_used <= cache.max_bytes
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert cache.bytes_used == len(cache) * 128 <= cache.max_bytes
    assert cache.hits + cache.misses > 0


# ---------------------------------------------------------------------------------------------- 6. security


def _project_modules() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in EXTENSION_DIR.glob("*.py")}


def test_no_unsafe_torch_load_and_no_remote_code():
    problems = []
    for name, tree in _project_modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if called.endswith("torch.load"):
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
            remote = keywords.get("trust_remote_code")
            if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                problems.append(f"{name}:{node.lineno}: trust_remote_code={ast.unparse(remote)}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not (
                            isinstance(value, ast.Constant) and value.value is False):
                        problems.append(f"{name}:{node.lineno}: trust_remote_code in a dict")
    assert not problems, problems
    # The checks above see the calls that exist (a vacuous pass would mean the scan found nothing).
    calls = [ast.unparse(n.func) for tree in _project_modules().values() for n in ast.walk(tree)
             if isinstance(n, ast.Call)]
    assert any(c.endswith("torch.load") for c in calls)


def test_script_never_fetches_or_opens_request_paths():
    """script.py handles request data; it must not reach the network or webui's URL-fetching helpers."""
    tree = _project_modules()["script.py"]
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"urllib", "requests", "httpx", "http", "socket", "aiohttp"}, imported
    names = {ast.unparse(node) for node in ast.walk(tree) if isinstance(node, (ast.Attribute, ast.Name))}
    assert not names & {"image_utils", "convert_openai_messages_to_images", "process_message_content", "urlopen"}


class _Tripwire:
    """Records (and refuses) any attempt to open the given paths or to reach the network."""

    def __init__(self, monkeypatch, forbidden_paths):
        self.attempts = []
        forbidden = {str(Path(p).resolve()) for p in forbidden_paths}
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and str(Path(os.fspath(file)).resolve()) in forbidden:
                self.attempts.append(("open", os.fspath(file)))
                raise PermissionError("test tripwire")
            return real_open(file, *args, **kwargs)

        def refuse(kind):
            def refused(*args, **kwargs):
                self.attempts.append((kind, args[:2]))
                raise OSError("test tripwire: no network")
            return refused

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
        monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
        monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
        monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))


def test_paths_and_urls_in_requests_are_refused_never_opened(make_harness, models, monkeypatch, tmp_path):
    secret = tmp_path / "secret.png"
    good_image(7).save(secret)
    harness = make_harness("hf")
    model = models("hf")
    tripwire = _Tripwire(monkeypatch, [secret])
    # UI: a history (e.g. a loaded chat file) whose attachment holds a path instead of a data URL.
    harness.history = {
        "internal": [["Look at this.", "OK."]], "visible": [["Look at this.", "OK."]],
        "metadata": {"user_0": {"attachments": [
            {"name": "secret.png", "type": "image", "image_data": str(secret), "image_id": 1}]}},
    }
    harness.regenerate()  # the row with the attachment is the current one: its notice is shown
    assert "secret.png" in visible(harness) and "only inline" in visible(harness)
    assert_text_only(harness.generate_calls[-1], model)
    harness.send("What was in it?")  # now a past row: skipped again (and logged), never opened
    assert_text_only(harness.generate_calls[-1], model)
    for url in ("http://127.0.0.1:9/cat.png", "https://example.invalid/cat.png", f"file://{secret}", str(secret)):
        calls = len(harness.generate_calls)
        try:
            harness.api_chat([{"role": "user", "content": [text_part("hi"), image_part(url)]}])
        except InvalidRequestError as error:  # a clean refusal is fine too
            assert error.code == 400
        else:
            assert len(harness.generate_calls) == calls + 1
            assert_text_only(harness.generate_calls[-1], model)
    assert not tripwire.attempts, tripwire.attempts
    # The tripwire works: the decoder, asked to read that path directly, is caught.
    with pytest.raises(ImageError):
        load_image(str(secret), name="direct")
    assert [kind for kind, _ in tripwire.attempts] == ["open"]


@pytest.mark.parametrize("kind, problem", [("file", "is a file"), ("missing", "does not exist"),
                                           ("empty folder", "is a folder without config.json")])
def test_vision_tower_setting_must_name_a_tower_folder(kind, problem, make_harness, models, tmp_path):
    target = {"file": tmp_path / "tower.safetensors", "missing": tmp_path / "nowhere",
              "empty folder": tmp_path / "empty"}[kind]
    if kind == "file":
        target.write_bytes(b"not a folder")
    elif kind == "empty folder":
        target.mkdir()
    harness = make_harness("v15", {"llava-vision_tower": str(target)})
    status = harness.extension._vision.status
    assert "could not be loaded" in status and f"{str(target)!r} (from the vision tower setting) {problem}" in status
    assert "hf download" not in status, status  # a path is not a hub id
    harness.send(QUESTION, [good_image()])
    assert visible(harness).startswith(NOTICE)
    _assert_text_chat_works(harness, models("v15"))


# ---------------------------------------------------------------------------------------------- real CLI runs


def test_cli_subprocess_answers_with_every_valid_file(cli_subprocesses):
    code, stdout, stderr = cli_subprocesses("valid")
    assert code == 0, stderr
    assert stdout.endswith("\n") and stdout.count("\n") == 1
    assert "Traceback" not in stderr and "error:" not in stderr
    valid = [case for case in bad_images.valid_cases() if case.has_file]
    assert re.search(rf"Encoded {len(valid)} image\(s\)", stderr), stderr[-2000:]


@pytest.mark.parametrize("case_id", ["bomb-gif"])
def test_cli_subprocess_refuses_a_bad_file_with_one_line(case_id, cli_subprocesses, corpus_files):
    code, stdout, stderr = cli_subprocesses(case_id)
    case = next(c for c in corpus() if c.id == case_id)
    assert code == 2 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: image 1 ({corpus_files[case_id]}): ") and re.search(case.reason, lines[0])
