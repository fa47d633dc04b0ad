"""GPU benchmark of the LLaVA extension against the transformers reference, in one process.

Run on a CUDA machine: ``python bench/bench_gpu.py [--reps N]`` (``bench/device_run.sh`` wraps it for
the lent device machines); on any machine ``--dry-run`` runs every step on the CPU with toy shapes
(checks the script, numbers mean nothing). Progress goes to stderr; the LAST line of stdout is one JSON
object.

Models (random weights, fp16, built on the meta device and materialised directly on the GPU): CLIP-L/336
tower, LLaVA-1.5 projector 1024 -> 4096 -> 4096 and the LLaVA-1.5-7B Llama (hidden 4096, 32 layers,
32 heads, MLP 11008, vocab 32064). The reference is transformers' ``LlavaForConditionalGeneration``.
The tower and projector are written as a llava-hf checkpoint (fp16 safetensors; the config describes
the whole 7B model) into a temp dir and loaded by the project's ``LlavaPipeline.load``. Our language
model is a ``LlamaForCausalLM`` whose modules are the reference's own language model and lm_head (so
both sides prefill with identical weights; writing and reloading 13 GB would only burn GPU time).

Ratios are ours / reference, timed interleaved after a warm-up with ``torch.cuda.synchronize()`` around
each call; reported as the median of per-round ratios; absolute times are medians.

* ``encode_ratio``: ``LlavaPipeline.encode_pixels(pixels)`` (truncated tower + projector, fp16, with
  CUDA graphs, on by default for a CUDA tower) / ``get_image_features(pixels)``, batch 1, same fp16
  pixels on the GPU. ``encode_eager_ratio``: our tower without graphs. ``graph_matches_eager``: the
  graph path's output is bit-identical to our eager forward for batches of 1 and 3;
  ``encode_diffs`` has the max |difference| of each pair (graph, eager, reference; batches 1 and 3).
  ``encode_max_abs_diff``: vs the reference.
* ``ttft_ratio``: time to the first token's logits for one new 1024x768 image (decoded, not cached)
  and 47 text tokens. Ours: ``LlavaPipeline.prepare`` (hash, preprocess, encode, tokenize, splice) +
  prefill with ``inputs_embeds``. Reference: ``LlavaProcessor`` (PIL image processor) + the model's
  forward with ``pixel_values``. Both end in ``argmax(...).item()``. The embedding cache is emptied
  before each of our runs. ``ttft_breakdown_ms``: each stage of both paths timed on its own.
* ``cached_followup_ratio``: a text-only follow-up in a chat holding 5 images (already cached). Ours: the
  extension's path (``bench_common.extension_followup``: sha256 of each re-sent PNG data URL, ``prepare``
  with cache hits and no decoding) and prefill. Reference: the same turn with no vision work: the
  same-length prompt through ``tokenizer(...)``, ``embed_tokens`` and the same prefill.
  ``cached_followup_decode_all_ratio``: the same turn decoding all 5 images first (what a pipeline
  without content keys would pay). ``followup_cached_equals_fresh``: the embeddings spliced from the
  (pinned) cache equal freshly encoded ones. ``followup_breakdown_ms``: the stages on their own.
* ``gpu_mem_overhead_mb``: GPU memory the extension keeps when the tower runs on the CPU
  (``clip_device="cpu"``, projector fp16 on the GPU): ``memory_allocated`` after loading that
  pipeline and preparing one image turn, minus before loading it (the language model alone).
  ``gpu_mem_peak_overhead_mb``: the peak during that load + prepare, minus the same base.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (sets up sys.path and the offline environment)
import bench_families  # noqa: E402
import torch  # noqa: E402

TEXT_TOKENS = 47
# The targets (ratios are ours / reference).
TARGETS = {"encode_ratio": 0.2, "ttft_ratio": 0.65, "cached_followup_ratio": 1.05, "gpu_mem_overhead_mb": 64.0}


class Bench:
    def __init__(self, args):
        self.args = args
        self.dry_run = args.dry_run
        self.device = torch.device("cpu") if args.dry_run else torch.device("cuda:0")
        self.dtype = torch.float32 if args.dry_run else torch.float16
        self.bits = "32" if args.dry_run else "16"
        self.result: dict = {"dry_run": args.dry_run, "repetitions": args.reps}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, candidates, repetitions, warmup=2, before_each=None):
        return bc.time_interleaved(candidates, repetitions, warmup=warmup, synchronize=self.sync, before_each=before_each)

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, root: Path) -> None:
        from transformers import AutoTokenizer

        from llava_pipeline import LlavaPipeline, VisionSettings

        if self.dry_run:
            vision = bc.clip_l_336_vision_config(num_layers=3, hidden=64, heads=4, intermediate=128, image_size=56)
            text = bc.llama_text_config(hidden=128, layers=2, heads=4, intermediate=256, vocab=1024)
        else:
            vision = bc.clip_l_336_vision_config()
            text = bc.llama_text_config(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32064)
        self.folder = root / "llava-1.5-7b-random"
        self.folder.mkdir()
        tokenizer = bc.write_tokenizer(self.folder)
        config = bc.llava_config(text, vision, tokenizer)
        started = time.perf_counter()
        self.reference = bc.build_llava(config, self.device, self.dtype, seed=0)
        self.sync()
        bc.log(f"built the reference on {self.device} in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        bc.write_llava_hf_checkpoint(self.folder, self.reference, with_language_model=False)
        bc.log(f"wrote the vision checkpoint in {time.perf_counter() - started:.1f} s")
        self.language_model = bc.text_only_causal_lm(self.reference)
        self.embed_tokens = self.language_model.get_input_embeddings()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        started = time.perf_counter()
        device = str(self.device)
        self.pipeline = LlavaPipeline.load(self.folder, VisionSettings(
            clip_device=device, projector_device=device, clip_bits=self.bits, projector_bits=self.bits))
        bc.log(f"LlavaPipeline.load in {time.perf_counter() - started:.1f} s: {self.pipeline.describe()}")
        # The default settings turn graphs on for a CUDA tower; recorded so a run without them is visible.
        self.result["cuda_graphs"] = self.pipeline.tower.cuda_graphs_enabled

    # ------------------------------------------------------------------------------------------ encode

    def bench_encode(self) -> None:
        import llava_preprocess

        image = bc.photo_like_image(1024, 768, seed=1)
        pixels = llava_preprocess.preprocess_batch([image], self.pipeline.preprocess_config)
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        reference, pipeline = self.reference, self.pipeline

        def run_reference():
            return reference.model.get_image_features(pixel_values=pixels).pooler_output[0]

        def run_eager():  # our tower's forward without the graph replay (bench-only use of the internal)
            return pipeline.projector(pipeline.tower._encode(pixels))[0]

        candidates = {"reference": run_reference, "ours": lambda: pipeline.encode_pixels(pixels)[0], "eager": run_eager}
        with torch.inference_mode():
            want = run_reference().float()
            ours, eager = candidates["ours"]().float(), run_eager().float()
            timing = self.timed(candidates, self.args.encode_reps, warmup=3)
        self.result["encode_reference_ms"] = bc.rounded(timing.median("reference") * 1000)
        self.result["encode_ms"] = bc.rounded(timing.median("ours") * 1000)
        self.result["encode_ratio"] = bc.rounded(timing.ratio("ours", "reference"))
        self.result["encode_eager_ms"] = bc.rounded(timing.median("eager") * 1000)
        self.result["encode_eager_ratio"] = bc.rounded(timing.ratio("eager", "reference"))
        # Several images (or anyres tiles) go through the tower as one batch: another captured shape.
        batch = pixels.expand(3, -1, -1, -1).contiguous()
        with torch.inference_mode():
            batch_replay, batch_eager = pipeline.encode_pixels(batch).float(), pipeline.projector(pipeline.tower._encode(batch)).float()
            eager_again = run_eager().float()
            batch_reference = torch.stack(list(reference.model.get_image_features(pixel_values=batch).pooler_output)).float()

        def max_diff(a, b):
            return bc.rounded(float((a - b).abs().max()), 6)

        self.result["graph_matches_eager"] = bool(torch.equal(ours, eager)) and bool(torch.equal(batch_replay, batch_eager))
        self.result["encode_diffs"] = {
            "b1_graph_vs_eager": max_diff(ours, eager), "b1_eager_vs_eager": max_diff(eager, eager_again),
            "b1_eager_vs_reference": max_diff(eager, want), "b3_graph_vs_eager": max_diff(batch_replay, batch_eager),
            "b3_graph_vs_reference": max_diff(batch_replay, batch_reference),
            "b3_eager_vs_reference": max_diff(batch_eager, batch_reference),
            "b3_row0_vs_b1_reference": max_diff(batch_reference[0], want),
        }
        self.result["captured_graph_shapes"] = [list(shape) for shape in getattr(pipeline.tower, "captured_graph_shapes", [])]
        self.result["encode_max_abs_diff"] = bc.rounded(float((ours - want).abs().max()))
        self.result["encode_rel_error"] = bc.rounded(float((ours - want).norm() / want.norm()))
        bc.log(f"[encode] {json.dumps({k: v for k, v in self.result.items() if 'encode' in k or 'graph' in k})}")

    # ------------------------------------------------------------------------------------------ TTFT

    def bench_ttft(self) -> None:
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        from llava_prompt import split_on_marker

        tokenizer, pipeline, language_model, reference = self.tokenizer, self.pipeline, self.language_model, self.reference
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil.from_pretrained(str(self.folder)), tokenizer=tokenizer,
            patch_size=reference.config.vision_config.patch_size, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        prompt = bc.fit_text_tokens(tokenizer, "USER: " + bc.IMAGE_MARKER + "\n{question} ASSISTANT:", TEXT_TOKENS,
                                    bc.FILLER_WORDS)
        image = bc.photo_like_image(1024, 768, seed=3)
        parts = split_on_marker(prompt, 1, bc.IMAGE_MARKER)

        def run_reference():
            inputs = processor(images=[image], text=prompt, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            logits = reference(**inputs, logits_to_keep=1).logits
            return logits[0, -1].argmax().item(), logits[0, -1].float(), inputs["input_ids"]

        def run_ours():
            prepared = pipeline.prepare(parts, [image], tokenizer, self.embed_tokens, add_bos=True)
            logits = language_model(inputs_embeds=prepared.inputs_embeds, logits_to_keep=1).logits
            return logits[0, -1].argmax().item(), logits[0, -1].float(), prepared.input_ids

        def clear_cache(name):
            if name == "ours":
                pipeline.cache.clear()

        self._ttft_breakdown(processor, prompt, image, parts)
        with torch.inference_mode():
            clear_cache("ours")
            ref_token, ref_logits, ref_ids = run_reference()
            our_token, our_logits, our_ids = run_ours()
            timing = self.timed({"reference": run_reference, "ours": run_ours}, self.args.reps, before_each=clear_cache)
        text_tokens = int((ref_ids != reference.config.image_token_id).sum())
        self.result["ttft_text_tokens"] = text_tokens
        self.result["ttft_prompt_tokens"] = int(ref_ids.shape[1])
        self.result["ttft_same_input_ids"] = ref_ids.tolist() == our_ids.tolist()
        self.result["ttft_same_first_token"] = ref_token == our_token
        self.result["ttft_logits_max_abs_diff"] = bc.rounded(float((ref_logits - our_logits).abs().max()))
        self.result["ttft_reference_ms"] = bc.rounded(timing.median("reference") * 1000)
        self.result["ttft_ms"] = bc.rounded(timing.median("ours") * 1000)
        self.result["ttft_ratio"] = bc.rounded(timing.ratio("ours", "reference"))
        bc.log(f"[ttft] {json.dumps({k: v for k, v in self.result.items() if k.startswith('ttft')})}")

    def _ttft_breakdown(self, processor, prompt, image, parts) -> None:
        """Each stage of both TTFT paths timed alone (medians, ms): where the time goes."""
        import llava_image_io
        import llava_preprocess

        pipeline, tokenizer, language_model, reference = self.pipeline, self.tokenizer, self.language_model, self.reference
        with torch.inference_mode():
            inputs = processor(images=[image], text=prompt, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            pixels = llava_preprocess.preprocess_batch([image], pipeline.preprocess_config)
            features = pipeline.encode_images([image])
            prompt_ids = pipeline.tokenize(parts, tokenizer, add_bos=True, image_sizes=[image.size])
            _, embeds = pipeline.embed(prompt_ids, features, self.embed_tokens)
            stages = {
                "ref_processor": lambda: processor(images=[image], text=prompt, return_tensors="pt"),
                "ref_forward": lambda: reference(**inputs, logits_to_keep=1).logits[0, -1].argmax().item(),
                "ours_pixel_digest": lambda: llava_image_io.image_digest(image),
                "ours_preprocess": lambda: llava_preprocess.preprocess_batch([image], pipeline.preprocess_config),
                "ours_encode": lambda: pipeline.encode_pixels(pixels.to(self.device)),
                "ours_tokenize": lambda: pipeline.tokenize(parts, tokenizer, add_bos=True, image_sizes=[image.size]),
                "ours_embed_splice": lambda: pipeline.embed(prompt_ids, features, self.embed_tokens),
                "ours_prefill": lambda: language_model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1].argmax().item(),
            }
            timing = self.timed(stages, self.args.reps)
        self.result["ttft_breakdown_ms"] = {name: bc.rounded(timing.median(name) * 1000) for name in stages}

    # ------------------------------------------------------------------------------------------ follow-up

    def bench_followup(self) -> None:
        from llava_image_io import source_digest
        from llava_prompt import split_on_marker

        tokenizer, pipeline, language_model, embed_tokens = self.tokenizer, self.pipeline, self.language_model, self.embed_tokens
        images = [bc.photo_like_image(1024, 768, seed=10 + i) for i in range(5)]
        urls = [bc.png_data_url(image) for image in images]
        prompt = bc.chat_prompt(tokenizer, len(images))
        parts = split_on_marker(prompt, len(images), bc.IMAGE_MARKER)
        plain_prompt = prompt.replace(bc.IMAGE_MARKER, bc.IMAGE_MARKER * pipeline.tokens_per_image)
        device = self.device

        def decode():
            return [pipeline.load_image(url, name=f"image {i + 1}") for i, url in enumerate(urls)]

        extension_turn = bc.extension_followup(pipeline, urls, parts, tokenizer, embed_tokens)

        def first_token(inputs_embeds):
            return language_model(inputs_embeds=inputs_embeds, logits_to_keep=1).logits[0, -1].argmax().item()

        candidates = {
            "ours": lambda: first_token(extension_turn()),
            "ours_decode_all": lambda: first_token(
                pipeline.prepare(parts, decode(), tokenizer, embed_tokens, add_bos=True).inputs_embeds),
            "baseline": lambda: first_token(
                embed_tokens(torch.tensor([tokenizer(plain_prompt)["input_ids"]], device=device))),
        }
        with torch.inference_mode():
            pipeline.cache.clear()
            # Freshly encoded (cached under pixel keys), then the extension's turn twice (a miss that fills
            # the cache under content keys, then hits spliced from the pinned copies): the same numbers.
            fresh = pipeline.prepare(parts, decode(), tokenizer, embed_tokens, add_bos=True).inputs_embeds
            extension_turn()
            prepared_embeds = extension_turn()
            self.result["followup_cached_equals_fresh"] = bool(torch.equal(prepared_embeds, fresh))
            length = len(tokenizer(plain_prompt)["input_ids"])
            if prepared_embeds.shape[1] != length:
                raise RuntimeError(f"follow-up prompt lengths differ: ours {prepared_embeds.shape[1]}, plain {length}")
            hits = pipeline.cache.hits
            timing = self.timed(candidates, self.args.reps)
            if pipeline.cache.hits - hits < 5 * 2 * (self.args.reps + 2):
                raise RuntimeError("the follow-up turns did not hit the embedding cache for every image")
            decode_timing = self.timed({"decode": decode}, self.args.reps, warmup=1)
            sizes = [image.size for image in images]
            keys = [source_digest(url) for url in urls]
            stages = {
                "ours_keys_of_resent_urls": lambda: [source_digest(url[:1] + url[1:]) for url in urls],
                "ours_prepare": lambda: pipeline.prepare(parts, [None] * len(urls), tokenizer, embed_tokens, add_bos=True,
                                                         image_sizes=sizes, keys=keys),
                "baseline_tokenize_embed": lambda: embed_tokens(
                    torch.tensor([tokenizer(plain_prompt)["input_ids"]], device=device)),
                "prefill": lambda: first_token(prepared_embeds),
            }
            stage_timing = self.timed(stages, self.args.reps)
        self.result["followup_breakdown_ms"] = {name: bc.rounded(stage_timing.median(name) * 1000) for name in stages}
        self.result["followup_tokens"] = length
        self.result["followup_ms"] = bc.rounded(timing.median("ours") * 1000)
        self.result["followup_baseline_ms"] = bc.rounded(timing.median("baseline") * 1000)
        self.result["cached_followup_ratio"] = bc.rounded(timing.ratio("ours", "baseline"))
        self.result["cached_followup_decode_all_ratio"] = bc.rounded(timing.ratio("ours_decode_all", "baseline"))
        self.result["followup_decode_5_images_ms"] = bc.rounded(decode_timing.median("decode") * 1000)
        bc.log(f"[follow-up] {json.dumps({k: v for k, v in self.result.items() if 'followup' in k})}")

    # ------------------------------------------------------------------------------------------ memory

    def bench_memory(self) -> None:
        """GPU memory the extension adds when its tower lives on the CPU (projector on the GPU)."""
        from llava_pipeline import LlavaPipeline, VisionSettings
        from llava_prompt import split_on_marker

        if self.device.type != "cuda":
            self.result["gpu_mem_overhead_mb"] = None
            self.result["gpu_mem_peak_overhead_mb"] = None
            cpu_tower = LlavaPipeline.load(self.folder, VisionSettings(clip_device="cpu", projector_device="cpu"))
            with torch.inference_mode():  # the same steps, for --dry-run coverage
                cpu_tower.prepare(split_on_marker("USER: <image>\nhi ASSISTANT:", 1), [bc.photo_like_image(640, 480, 4)],
                                  self.tokenizer, self.embed_tokens, add_bos=True)
            return
        # The GPU pipeline's cache and graphs are released first so that only the CPU-tower pipeline counts.
        self.pipeline.unload()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        cpu_tower = LlavaPipeline.load(self.folder, VisionSettings(
            clip_device="cpu", clip_bits="32", projector_device=str(self.device), projector_bits="16"))
        with torch.inference_mode():
            prepared = cpu_tower.prepare(split_on_marker("USER: <image>\nWhat is this? ASSISTANT:", 1),
                                         [bc.photo_like_image(1024, 768, 5)], self.tokenizer, self.embed_tokens, add_bos=True)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated(self.device) - base
        # inputs_embeds is the prompt the LM would get anyway (the text-only path makes one too).
        prompt_bytes = prepared.inputs_embeds.numel() * prepared.inputs_embeds.element_size()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.result["gpu_mem_overhead_mb"] = bc.rounded((resident - prompt_bytes) / 2**20)
        self.result["gpu_mem_peak_overhead_mb"] = bc.rounded(peak / 2**20)
        self.result["gpu_mem_lm_alone_mb"] = bc.rounded(base / 2**20)
        bc.log(f"[memory] {json.dumps({k: v for k, v in self.result.items() if k.startswith('gpu_mem')})}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="timed rounds for TTFT and follow-up (default 10)")
    parser.add_argument("--encode-reps", type=int, default=50)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy shapes: checks the script only")
    parser.add_argument("--tmp", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--families", type=bench_families.parse_family_list, default=[],
                        help="also time the fp16 vision encode of these checkpoint families (bench_families.py)")
    parser.add_argument("--family-reps", type=int, default=10)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs CUDA; use --dry-run to check it on the CPU")
    started = time.perf_counter()
    bench = Bench(args)
    bench.result["device_name"] = torch.cuda.get_device_name(0) if not args.dry_run else "cpu (dry run)"
    bench.result["torch"] = torch.__version__
    with tempfile.TemporaryDirectory(prefix="llava_bench_gpu_", dir=args.tmp) as tmp:
        bench.setup(Path(tmp))
        bench.bench_encode()
        bench.bench_ttft()
        bench.bench_followup()
        bench.bench_memory()
        if args.families:
            device = "cpu" if args.dry_run else "cuda:0"
            bench.result["families"] = bench_families.bench_families(
                args.families, Path(tmp), device=device, dtype=torch.float32 if args.dry_run else torch.float16,
                reps=args.family_reps, tiny=args.dry_run,
                synchronize=None if args.dry_run else torch.cuda.synchronize)
    bench.result["total_s"] = round(time.perf_counter() - started, 1)
    bench.result["targets"] = TARGETS
    bench.result["targets_met"] = bc.targets_met(bench.result, TARGETS)
    print(json.dumps(bench.result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
