"""CPU benchmark of the LLaVA extension against the transformers reference, in one process.

Run: ``python bench/bench_cpu.py [--reps N] [--ablation] [--tiny]``. Progress goes to stderr; the LAST
line of stdout is one JSON object. Nothing is downloaded: random-weight models of real shapes are
written as llava-hf checkpoints (fp16 safetensors) into a temp dir and loaded with the project's own
``LlavaPipeline.load`` / ``load_language_model``.

Models:
* "encode": CLIP-L/336 tower (hidden 1024, 24 layers, 16 heads, MLP 4096, 14 px patches, 336 px) and
  the LLaVA-1.5-7B projector (1024 -> 4096 -> 4096). The reference is transformers'
  ``LlavaForConditionalGeneration`` with the same weights (its language model stays on the meta device:
  ``get_image_features`` never touches it, and a 7B LM does not fit this box).
* "chat": the same tower, a small Llama (hidden 1024, 4 layers, 16 heads, MLP 2816, vocab 32064) and a
  1024 -> 1024 -> 1024 projector, for the prompt-side measurements.

Every ratio is ours / reference, timed interleaved (reference, ours, reference, ours, ...) after a
warm-up, and reported as the median over rounds of the per-round ratio (a load spike on a shared
machine then hits both sides of a round); absolute times are medians. ``*_cpu_time_ratio`` is the same
from this process's CPU time, a cross-check when other processes load the machine (``load_average_*``
says how busy it was). Definitions:

* ``encode_fp32_ratio``: ``LlavaPipeline.encode_pixels(pixels)`` (truncated tower + projector, fp32)
  / ``LlavaForConditionalGeneration.get_image_features(pixels)`` (fp32, sdpa), batch 1, same pixels.
  ``encode_fp32_max_abs_diff`` is the largest |ours - reference| over the [576, 4096] output.
  ``encode_fp32_matmul_s``: the time our encode spends in its matrix products (one profiled call), and
  ``encode_fp32_matmul_floor_ratio`` that / the reference's whole encode: the ratio no exact fp32 encode
  with this GEMM library can beat on this CPU (``encode_fp32_matmul_gflops_per_s`` is their rate).
* ``encode_bf16_ratio``: the same encode with ``clip_bits = projector_bits = "bf16"`` / the fp32
  reference; ``encode_bf16_max_abs_diff`` and ``encode_bf16_rel_error`` (||d|| / ||ref||) vs fp32.
* ``preprocess_ratio``: ``llava_preprocess.preprocess_batch([image], cfg)`` / transformers
  ``CLIPImageProcessorPil`` on the checkpoint's preprocessor_config.json, one 1024x768 RGB image;
  ``preprocess_max_abs_diff`` must be 0.0 (bit-identical). ``preprocess_pad_*``: the same for
  LLaVA-1.5's pad-to-square against ``LlavaImageProcessorPil(do_pad=True)``.
* ``cached_followup_ratio``: a text-only follow-up in a chat holding 5 images (1024x768 PNGs, already
  encoded once, so the cache holds them). Ours: the extension's path (``bench_common.extension_followup``:
  webui re-sends every image as a data URL on every turn; each gets its sha256 content key, ``prepare``
  tokenizes, hits the cache without decoding and splices) and the language model's prefill up to the
  first token's logits. Reference: the same turn with no vision work: the same-length prompt (each image
  as 576 ``<image>`` text tokens) through ``tokenizer(...)``, ``embed_tokens`` and the same prefill.
  ``cached_followup_decode_all_ratio``: the same turn decoding all 5 images first (what a pipeline without
  content keys would pay). ``followup_overhead_ms``: the extension's part of the turn alone, its prompt
  preparation minus the plain ``tokenizer`` + ``embed_tokens`` (timed interleaved, at least 10 rounds);
  ``cached_followup_ratio_by_parts`` = 1 + that / the baseline turn: the same ratio without the
  prefill's run-to-run spread, which on a 2-core box moves the direct ratio by several %.
* ``text_turn_overhead_ms``: median ``LlavaPipeline.prepare`` of a text-only prompt (no images) minus
  median ``tokenizer(text)`` + ``embed_tokens`` of the same text (same ids, checked).

``--families vipllava,pixtral,...`` adds one row per checkpoint family under ``families``: the vision encode
of a 1024x768 image at the family's real shape, ours / the family's ``get_image_features`` (bench_families.py).

``--ablation`` also times the truncated tower run through the stock transformers layers
(``encode_fp32_plain_layers_ratio``): what truncation alone gives, before our layer forward.
``--tiny`` uses toy shapes to check the script itself in seconds (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (sets up sys.path and the offline environment)
import bench_families  # noqa: E402
import torch  # noqa: E402


# The targets (ratios are ours / reference; the diff must be exactly 0).
TARGETS = {
    "encode_fp32_ratio": 0.6, "encode_bf16_ratio": 0.3, "preprocess_ratio": 0.5, "preprocess_max_abs_diff": 0.0,
    "cached_followup_ratio": 1.05, "text_turn_overhead_ms": 1.0,
}


def cpu_facts() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_has_avx512f": "avx512f" in flags,
        "cpu_has_avx512_bf16": "avx512_bf16" in flags,
        "cpu_has_amx_bf16": "amx_bf16" in flags,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def plain_layers_encode(pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """Ablation: the truncated tower through the stock transformers layers (the pre-optimisation path)."""
    tower = pipeline.tower
    hidden = tower.pre_layrnorm(tower.embeddings(pixels.to(next(tower.parameters()).dtype)))
    for layer in tower.encoder.layers:
        hidden = layer(hidden, None)
    return pipeline.projector(hidden[:, 1:])


def matmul_time(function) -> tuple[float, float]:
    """Seconds and FLOPs of the matrix products in one profiled call of ``function`` (torch.profiler's
    self CPU time of the addmm / mm / bmm operators: their time on the calling thread, MKL's threads
    working inside it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiled:
        function()
    events = [e for e in profiled.key_averages() if e.key in ("aten::addmm", "aten::mm", "aten::bmm")]
    return sum(e.self_cpu_time_total for e in events) / 1e6, float(sum(e.flops for e in events))


def bench_encode(root: Path, args, shapes: dict, result: dict) -> None:
    from llava_pipeline import LlavaPipeline, VisionSettings
    import llava_preprocess

    folder = root / "encode"
    folder.mkdir()
    tokenizer = bc.write_tokenizer(folder)
    config = bc.llava_config(shapes["text_7b"], shapes["vision"], tokenizer)
    started = time.perf_counter()
    reference = bc.build_llava(config, "cpu", torch.float32, seed=0, vision_only=True)
    bc.write_llava_hf_checkpoint(folder, reference, with_language_model=False)
    bc.log(f"[encode] built and wrote the reference in {time.perf_counter() - started:.1f} s")

    fp32 = LlavaPipeline.load(folder, VisionSettings(clip_device="cpu", projector_device="cpu"))
    bf16 = LlavaPipeline.load(folder, VisionSettings(clip_device="cpu", projector_device="cpu",
                                                     clip_bits="bf16", projector_bits="bf16"))
    image = bc.photo_like_image(1024, 768, seed=1)
    pixels = llava_preprocess.preprocess_batch([image], fp32.preprocess_config)

    def run_reference():
        return reference.model.get_image_features(pixel_values=pixels).pooler_output[0]

    candidates = {"reference": run_reference, "fp32": lambda: fp32.encode_pixels(pixels)[0]}
    if not args.skip_bf16:
        candidates["bf16"] = lambda: bf16.encode_pixels(pixels)[0]
    if args.ablation:
        candidates["plain_layers"] = lambda: plain_layers_encode(fp32, pixels)[0]
    with torch.inference_mode():
        want = run_reference()
        outputs = {name: fn().float() for name, fn in candidates.items() if name != "reference"}
        bc.log(f"[encode] timing {list(candidates)} x {args.reps} rounds")
        timing = bc.time_interleaved(candidates, args.reps, max_rounds={"bf16": args.bf16_reps})
    result["reference_encode_fp32_s"] = bc.rounded(timing.median("reference"))
    result["encode_fp32_s"] = bc.rounded(timing.median("fp32"))
    result["encode_fp32_ratio"] = bc.rounded(timing.ratio("fp32", "reference"))
    result["encode_fp32_cpu_time_ratio"] = bc.rounded(timing.ratio("fp32", "reference", cpu=True))
    result["encode_fp32_max_abs_diff"] = float((outputs["fp32"] - want).abs().max())
    with torch.inference_mode():
        matmul_s, matmul_flops = matmul_time(lambda: fp32.encode_pixels(pixels))
    result["encode_fp32_matmul_s"] = bc.rounded(matmul_s)
    result["encode_fp32_matmul_gflops_per_s"] = bc.rounded(matmul_flops / matmul_s / 1e9)
    result["encode_fp32_matmul_floor_ratio"] = bc.rounded(matmul_s / timing.median("reference"))
    if "bf16" in candidates:
        difference = outputs["bf16"] - want
        result["encode_bf16_s"] = bc.rounded(timing.median("bf16"))
        result["encode_bf16_ratio"] = bc.rounded(timing.ratio("bf16", "reference"))
        result["encode_bf16_cpu_time_ratio"] = bc.rounded(timing.ratio("bf16", "reference", cpu=True))
        result["encode_bf16_max_abs_diff"] = bc.rounded(float(difference.abs().max()))
        result["encode_bf16_rel_error"] = bc.rounded(float(difference.norm() / want.norm()))
    if "plain_layers" in candidates:
        result["encode_fp32_plain_layers_s"] = bc.rounded(timing.median("plain_layers"))
        result["encode_fp32_plain_layers_ratio"] = bc.rounded(timing.ratio("plain_layers", "reference"))
        result["encode_fp32_plain_layers_cpu_time_ratio"] = bc.rounded(timing.ratio("plain_layers", "reference", cpu=True))
        result["encode_fp32_plain_layers_max_abs_diff"] = float((outputs["plain_layers"] - want).abs().max())
    bc.log(f"[encode] {json.dumps({k: v for k, v in result.items() if k.startswith(('encode', 'reference'))})}")

    bench_preprocess(folder, fp32.preprocess_config, args, result)
    del reference, fp32, bf16
    gc.collect()


def bench_preprocess(folder: Path, cfg, args, result: dict) -> None:
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

    import llava_preprocess

    image = bc.photo_like_image(1024, 768, seed=2)
    crop_reference = CLIPImageProcessorPil.from_pretrained(str(folder))
    pad_reference = LlavaImageProcessorPil.from_pretrained(str(folder), do_pad=True)
    pad_cfg = dataclasses.replace(cfg, pad_to_square=True)
    candidates = {
        "reference": lambda: crop_reference(images=[image], return_tensors="pt")["pixel_values"],
        "ours": lambda: llava_preprocess.preprocess_batch([image], cfg),
        "pad_reference": lambda: pad_reference(images=[image], return_tensors="pt")["pixel_values"],
        "pad_ours": lambda: llava_preprocess.preprocess_batch([image], pad_cfg),
    }
    outputs = {name: fn() for name, fn in candidates.items()}
    timing = bc.time_interleaved(candidates, args.preprocess_reps, warmup=2)
    for prefix, ours, reference in (("preprocess", "ours", "reference"), ("preprocess_pad", "pad_ours", "pad_reference")):
        if outputs[ours].shape != outputs[reference].shape:
            raise RuntimeError(f"{prefix}: shape {tuple(outputs[ours].shape)} != reference {tuple(outputs[reference].shape)}")
        result[f"{prefix}_ratio"] = bc.rounded(timing.ratio(ours, reference))
        result[f"{prefix}_cpu_time_ratio"] = bc.rounded(timing.ratio(ours, reference, cpu=True))
        result[f"{prefix}_max_abs_diff"] = float((outputs[ours] - outputs[reference]).abs().max())
        result[f"{prefix}_ms"] = bc.rounded(timing.median(ours) * 1000)
        result[f"{prefix}_reference_ms"] = bc.rounded(timing.median(reference) * 1000)
    bc.log(f"[preprocess] {json.dumps({k: v for k, v in result.items() if k.startswith('preprocess')})}")


def bench_chat(root: Path, args, shapes: dict, result: dict) -> None:
    from transformers import AutoTokenizer

    from llava_checkpoint import load_language_model
    from llava_pipeline import LlavaPipeline, VisionSettings
    from llava_prompt import split_on_marker

    folder = root / "chat"
    folder.mkdir()
    tokenizer = bc.write_tokenizer(folder)
    config = bc.llava_config(shapes["text_small"], shapes["vision"], tokenizer)
    model = bc.build_llava(config, "cpu", torch.float32, seed=1)
    bc.write_llava_hf_checkpoint(folder, model, with_language_model=True)
    del model
    gc.collect()
    language_model = load_language_model(folder, dtype=torch.float32).eval()
    pipeline = LlavaPipeline.load(folder, VisionSettings(clip_device="cpu", projector_device="cpu"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    embed_tokens = language_model.get_input_embeddings()
    tokens_per_image = pipeline.tokens_per_image

    # --- text-only turn: prepare() with no images vs tokenizer + embed_tokens
    text = bc.chat_prompt(tokenizer, 0) * 6  # a few hundred tokens, no images
    with torch.inference_mode():
        ours_ids = pipeline.prepare([text], [], tokenizer, embed_tokens, add_bos=True).input_ids[0].tolist()
        plain_ids = tokenizer(text)["input_ids"]
        if ours_ids != plain_ids:
            raise RuntimeError("prepare() and the plain tokenizer disagree on a text-only prompt")
        timing = bc.time_interleaved({
            "prepare": lambda: pipeline.prepare([text], [], tokenizer, embed_tokens, add_bos=True),
            "plain": lambda: embed_tokens(torch.tensor([tokenizer(text)["input_ids"]])),
        }, args.text_reps, warmup=10)
    result["text_turn_tokens"] = len(plain_ids)
    result["text_turn_prepare_ms"] = bc.rounded(timing.median("prepare") * 1000)
    result["text_turn_baseline_ms"] = bc.rounded(timing.median("plain") * 1000)
    result["text_turn_overhead_ms"] = bc.rounded((timing.median("prepare") - timing.median("plain")) * 1000, 3)
    bc.log(f"[text turn] {len(plain_ids)} tokens: prepare {result['text_turn_prepare_ms']} ms, "
           f"tokenizer+embed {result['text_turn_baseline_ms']} ms")

    # --- follow-up in a chat holding 5 images
    images = [bc.photo_like_image(1024, 768, seed=10 + i) for i in range(5)]
    urls = [bc.png_data_url(image) for image in images]
    prompt = bc.chat_prompt(tokenizer, len(images))
    parts = split_on_marker(prompt, len(images), bc.IMAGE_MARKER)
    plain_prompt = prompt.replace(bc.IMAGE_MARKER, bc.IMAGE_MARKER * tokens_per_image)

    def decode():
        return [pipeline.load_image(url, name=f"image {i + 1}") for i, url in enumerate(urls)]

    def first_token(inputs_embeds):
        return language_model(inputs_embeds=inputs_embeds, logits_to_keep=1).logits[0, -1].argmax()

    extension_turn = bc.extension_followup(pipeline, urls, parts, tokenizer, embed_tokens)

    def ours_followup():
        return first_token(extension_turn())

    def ours_followup_decode_all():
        return first_token(pipeline.prepare(parts, decode(), tokenizer, embed_tokens, add_bos=True).inputs_embeds)

    def plain_embeds():
        return embed_tokens(torch.tensor([tokenizer(plain_prompt)["input_ids"]]))

    def baseline():
        return first_token(plain_embeds())

    with torch.inference_mode():
        started = time.perf_counter()
        prepared_embeds = extension_turn()  # fills the cache
        result["encode_5_images_s"] = bc.rounded(time.perf_counter() - started)
        pipeline.prepare(parts, decode(), tokenizer, embed_tokens, add_bos=True)  # and under pixel keys
        baseline_length = len(tokenizer(plain_prompt)["input_ids"])
        if prepared_embeds.shape[1] != baseline_length:
            raise RuntimeError(f"follow-up prompt lengths differ: ours {prepared_embeds.shape[1]}, plain {baseline_length}")
        hits_before = pipeline.cache.hits
        bc.log(f"[follow-up] {baseline_length} tokens, timing x {args.reps} rounds")
        timing = bc.time_interleaved(
            {"ours": ours_followup, "ours_decode_all": ours_followup_decode_all, "baseline": baseline}, args.reps
        )
        if pipeline.cache.hits - hits_before < 5 * 2 * (args.reps + 1):
            raise RuntimeError("the follow-up turns did not hit the embedding cache for every image")
        decode_timing = bc.time_interleaved({"decode": decode}, max(3, args.reps))
        # The turns' difference without the prefill, whose run-to-run spread on a small shared CPU (several
        # % of 3 s) can exceed what the extension adds: its prompt preparation vs the plain one's.
        prepare_timing = bc.time_interleaved({"prepare": extension_turn, "plain": plain_embeds}, max(10, args.reps))
    result["followup_tokens"] = baseline_length
    result["followup_s"] = bc.rounded(timing.median("ours"))
    result["followup_baseline_s"] = bc.rounded(timing.median("baseline"))
    result["cached_followup_ratio"] = bc.rounded(timing.ratio("ours", "baseline"))
    result["cached_followup_decode_all_ratio"] = bc.rounded(timing.ratio("ours_decode_all", "baseline"))
    result["cached_followup_cpu_time_ratio"] = bc.rounded(timing.ratio("ours", "baseline", cpu=True))
    result["followup_decode_5_images_ms"] = bc.rounded(decode_timing.median("decode") * 1000)
    result["followup_prepare_cached_ms"] = bc.rounded(prepare_timing.median("prepare") * 1000)
    result["followup_prepare_baseline_ms"] = bc.rounded(prepare_timing.median("plain") * 1000)
    overhead_s = prepare_timing.median("prepare") - prepare_timing.median("plain")
    result["followup_overhead_ms"] = bc.rounded(overhead_s * 1000)
    result["cached_followup_ratio_by_parts"] = bc.rounded(1 + overhead_s / timing.median("baseline"))
    bc.log(f"[follow-up] {json.dumps({k: v for k, v in result.items() if 'followup' in k})}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed rounds for encode and follow-up (default 5)")
    parser.add_argument("--bf16-reps", type=int, default=2, help="rounds that include the bf16 encode (default 2)")
    parser.add_argument("--preprocess-reps", type=int, default=15)
    parser.add_argument("--text-reps", type=int, default=200)
    parser.add_argument("--skip-bf16", action="store_true", help="skip the (slow on CPUs without bf16 units) bf16 encode")
    parser.add_argument("--ablation", action="store_true", help="also time the truncated tower with stock layers")
    parser.add_argument("--tiny", action="store_true", help="toy shapes: checks the script, numbers mean nothing")
    parser.add_argument("--only", choices=("encode", "chat", "families"), default=None,
                        help="run one part: encode (+ preprocess), chat (text turn + follow-up) or families")
    parser.add_argument("--families", type=bench_families.parse_family_list, default=[],
                        help="also time the vision encode of these checkpoint families (bench_families.py; "
                             f"comma-separated from {','.join(bench_families.BUILDERS)}); slow at real shapes")
    parser.add_argument("--family-reps", type=int, default=3, help="timed rounds per family (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--tmp", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        shapes = {
            "vision": bc.clip_l_336_vision_config(num_layers=3, hidden=64, heads=4, intermediate=128, image_size=56),
            "text_7b": bc.llama_text_config(hidden=128, layers=2, heads=4, intermediate=256, vocab=1024),
            "text_small": bc.llama_text_config(hidden=64, layers=2, heads=4, intermediate=128, vocab=1024),
        }
    else:
        shapes = {
            "vision": bc.clip_l_336_vision_config(),
            "text_7b": bc.llama_text_config(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32064),
            "text_small": bc.llama_text_config(hidden=1024, layers=4, heads=16, intermediate=2816, vocab=32064),
        }
    started = time.perf_counter()
    result: dict = {"device": "cpu", "tiny_shapes": args.tiny, "repetitions": args.reps,
                    "bf16_repetitions": 0 if args.skip_bf16 else min(args.bf16_reps, args.reps), **cpu_facts(),
                    "load_average_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="llava_bench_", dir=args.tmp) as tmp:
        if args.only in (None, "encode"):
            bench_encode(Path(tmp), args, shapes, result)
        if args.only in (None, "chat"):
            bench_chat(Path(tmp), args, shapes, result)
        if args.families and args.only in (None, "families"):
            result["families"] = bench_families.bench_families(args.families, Path(tmp), reps=args.family_reps,
                                                               tiny=args.tiny)
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    result["targets"] = TARGETS
    result["targets_met"] = bc.targets_met(result, TARGETS)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
