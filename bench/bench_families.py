"""One benchmark row per checkpoint family: the vision encode of one image, ours against the reference.

Used by ``bench_cpu.py --families ...`` and ``bench_gpu.py --families ...``; runnable alone:
``python bench/bench_families.py [--families vipllava,pixtral,mistral3] [--reps N] [--device cpu]``.
Progress goes to stderr, the last stdout line is one JSON object.

Each family is built at the shape of its best-known checkpoint with seeded random weights (the language
model stays on the meta device: ``get_image_features`` never touches it), its vision tower and projector
are written as a checkpoint in the transformers layout (fp16 safetensors, the processor's settings) and
loaded back with ``LlavaPipeline.load``. Both sides encode the same pixels (a 1024x768 photo-like image
through the family's preprocessing); the row reports the median seconds of each, their per-round ratio
(ours / reference, interleaved rounds), the image's feature rows and the largest |difference|.

=========  ======================================================  =============================================
family     shape                                                   reference call
=========  ======================================================  =============================================
vipllava   CLIP-L/336, layers [-2, -5, -8, -11, 6], layernorm +    ``VipLlavaModel.get_image_features``
           MLP 5x1024 -> 4096 -> 4096 (llava-hf/vip-llava-7b-hf)
pixtral    Pixtral-12B vision (1024 wide, 24 layers, 16 px patches,  ``LlavaModel.get_image_features``
           1024 px), MLP 1024 -> 5120 -> 5120                        (``image_sizes``, layer -1, "full")
mistral3   Mistral-Small-3.1 vision (24 layers, 14 px patches,     ``Mistral3Model.get_image_features``
           1540 px), RMS norm, 2x2 patch merger, MLP -> 5120
onevision  SigLIP so400m/384 (26 layers), MLP 1152 -> 3584 ->      ``LlavaOnevisionModel.get_image_features``
           3584, anyres_max_9 over 384 px tiles                    (``image_sizes``; tiles packed, unpadded,
           (llava-onevision-qwen2-7b-ov-hf)                        downscaled, with image_newline)
aya        SigLIP so400m at 364 px (27 layers), pixel shuffle,     ``AyaVisionModel.get_image_features``
           LayerNorm, SwiGLU 4608 -> 28672 -> 4096, up to 12        (every tile and the thumbnail)
           tiles + thumbnail (CohereLabs/aya-vision-8b)
=========  ======================================================  =============================================

For the tiled families (onevision, aya) both sides encode every tile of the image and the row compares all
of the image's feature rows (ours: ``encode_pixels`` then the plan's packing).

Families of other helpers add a builder to :data:`BUILDERS`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (sets up sys.path and the offline environment)
import torch  # noqa: E402


def _pixtral_vision(patch: int, image_size: int, layers: int = 24) -> dict:
    return {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": layers,
            "num_attention_heads": 16, "head_dim": 64, "image_size": image_size, "patch_size": patch,
            "hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def _mistral_text(hidden: int = 5120) -> dict:
    return {"model_type": "mistral", "hidden_size": hidden, "num_hidden_layers": 40, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 131072,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "sliding_window": None}


def _vipllava(tiny: bool):
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    vision = bc.clip_l_336_vision_config(**({"num_layers": 12, "hidden": 64, "heads": 4, "intermediate": 128,
                                             "image_size": 56} if tiny else {}))
    text = bc.llama_text_config(hidden=128 if tiny else 4096, layers=2 if tiny else 32, heads=4 if tiny else 32,
                                intermediate=256 if tiny else 11008, vocab=1024 if tiny else 32064)
    config = VipLlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                            vision_feature_layers=[-2, -5, -8, -11, 6])
    return VipLlavaForConditionalGeneration, config, _clip_files(vision), {}


def _pixtral(tiny: bool):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = _pixtral_vision(16, 1024) if not tiny else {**_pixtral_vision(8, 64, layers=2), "hidden_size": 64,
                                                          "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 16}
    text = _mistral_text(128 if tiny else 5120)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=10, vision_feature_layer=-1,
                         vision_feature_select_strategy="full", projector_hidden_act="gelu")
    return LlavaForConditionalGeneration, config, _pixtral_files(vision, merge=None), {"vision_feature_layer": -1,
                                                                                       "vision_feature_select_strategy": "full"}


def _mistral3(tiny: bool):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    vision = _pixtral_vision(14, 1540) if not tiny else {**_pixtral_vision(8, 64, layers=2), "hidden_size": 64,
                                                          "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 16}
    config = Mistral3Config(vision_config=vision, text_config=_mistral_text(128 if tiny else 5120),
                            image_token_index=10, spatial_merge_size=2, vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration, config, _pixtral_files(vision, merge=2), {}


def _clip_files(vision: dict) -> dict:
    size = vision["image_size"]
    return {
        "preprocessor_config.json": {
            "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": bc.OPENAI_CLIP_MEAN,
            "image_std": bc.OPENAI_CLIP_STD, "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"shortest_edge": size}},
        "processor_config.json": {"image_token": "<image>", "num_additional_image_tokens": 1,
                                  "patch_size": vision["patch_size"], "processor_class": "LlavaProcessor",
                                  "vision_feature_select_strategy": "default"},
    }


def _pixtral_files(vision: dict, merge: int | None) -> dict:
    patch = vision["patch_size"]
    processor = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
                 "patch_size": patch, "processor_class": "PixtralProcessor"}
    if merge:
        processor["spatial_merge_size"] = merge
    return {
        "preprocessor_config.json": {
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": bc.OPENAI_CLIP_MEAN, "image_std": bc.OPENAI_CLIP_STD,
            "image_processor_type": "PixtralImageProcessor", "patch_size": {"height": patch, "width": patch},
            "processor_class": "PixtralProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"longest_edge": vision["image_size"]}},
        "processor_config.json": processor,
    }


def _so400m(image_size: int, layers: int, tiny: bool) -> dict:
    """google/siglip-so400m-patch14-384 vision config (at ``image_size``), or a toy one."""
    if tiny:
        return {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
                "vision_use_head": False}
    return {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": layers, "num_attention_heads": 16, "image_size": image_size, "patch_size": 14,
            "vision_use_head": False, "layer_norm_eps": 1e-6}


def _onevision(tiny: bool):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vision = _so400m(384, 26, tiny)
    text = {"model_type": "qwen2", "hidden_size": 128 if tiny else 3584, "num_hidden_layers": 2 if tiny else 28,
            "num_attention_heads": 4 if tiny else 28, "num_key_value_heads": 2 if tiny else 4,
            "intermediate_size": 256 if tiny else 18944, "vocab_size": 152128}
    tile = vision["image_size"]
    pinpoints = [[tile * rows, tile * cols] for rows in range(1, 7) for cols in range(1, 7)]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                  image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    tokens = (tile // vision["patch_size"]) ** 2
    files = {
        "preprocessor_config.json": {
            "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
            "image_grid_pinpoints": pinpoints, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
            "resample": 3, "rescale_factor": 1 / 255, "size": {"height": tile, "width": tile}},
        "processor_config.json": {"image_token": "<image>", "num_image_tokens": tokens,
                                  "processor_class": "LlavaOnevisionProcessor", "vision_aspect_ratio": "anyres_max_9",
                                  "vision_feature_select_strategy": "full"},
    }
    sizes = lambda image, pixels: {"image_sizes": torch.tensor([[image.size[1], image.size[0]]]),  # noqa: E731
                                   "batch_num_images": torch.tensor([1])}
    return LlavaOnevisionForConditionalGeneration, config, files, {"per_image": sizes}


def _aya(tiny: bool):
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    import tiny_aya_vision

    vision = _so400m(364, 27, tiny)
    text = {"model_type": "cohere2", "hidden_size": 128 if tiny else 4096, "num_hidden_layers": 4 if tiny else 32,
            "num_attention_heads": 4 if tiny else 32, "num_key_value_heads": 2 if tiny else 8,
            "intermediate_size": 256 if tiny else 14336, "vocab_size": 1024 if tiny else 256000}
    config = AyaVisionConfig(vision_config=vision, text_config=text, image_token_index=2, downsample_factor=2,
                             vision_feature_layer=-1, vision_feature_select_strategy="full",
                             alignment_intermediate_size=256 if tiny else 28672)
    tile = vision["image_size"]
    files = {
        "preprocessor_config.json": {
            "crop_to_patches": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "GotOcr2ImageProcessor", "max_patches": 12, "min_patches": 1,
            "processor_class": "AyaVisionProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"height": tile, "width": tile}},
        "processor_config.json": {**tiny_aya_vision.processor_dict(), "img_size": tile},
        # The plan spells the tile labels with the checkpoint's tokenizer: the tests' Cohere-style one.
        "tokenizer": lambda folder: tiny_aya_vision._write_tokenizer(folder, tiny_aya_vision.train_cohere_tokenizer()),
    }
    return AyaVisionForConditionalGeneration, config, files, {}


#: family -> builder(tiny) -> (model class, config, processor files {name: json, or a writer(folder)},
#: get_image_features kwargs; ``per_image`` maps (image, pixels) to more kwargs)
BUILDERS: dict[str, Callable] = {"vipllava": _vipllava, "pixtral": _pixtral, "mistral3": _mistral3,
                                 "onevision": _onevision, "aya": _aya}


def build_vision_only(model_class, config, device, dtype, seed: int):
    """The model on the meta device with only its vision tower and projector materialised on ``device``:
    seeded N(0, 0.02²) weights rounded to fp16 (the on-disk precision), norm weights 1, biases N(0, 0.01²)."""
    with torch.device("meta"):
        model = model_class(config)
    model = model.to(dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    bc.fill_seeded_weights((model.model.vision_tower, model.model.multi_modal_projector), device, generator)
    if isinstance(getattr(model.model, "image_newline", None), torch.nn.Parameter):  # OneVision
        newline = (torch.randn(model.model.image_newline.shape, generator=generator, device=device) * 0.02)
        # Rounded to fp16 like every other weight: the checkpoint stores it in fp16.
        model.model.image_newline = torch.nn.Parameter(newline.to(torch.float16).to(dtype), requires_grad=False)
    tower = model.model.vision_tower
    if hasattr(tower, "embeddings"):  # CLIP
        positions = tower.embeddings.position_ids
        positions.copy_(torch.arange(positions.shape[-1], device=positions.device).expand_as(positions))
    if hasattr(tower, "patch_positional_embedding"):  # Pixtral's RoPE table
        rotary = tower.patch_positional_embedding
        inv_freq, _ = rotary.compute_default_rope_parameters(tower.config, device=device)
        rotary.inv_freq.copy_(inv_freq)
        rotary.original_inv_freq.copy_(inv_freq)
    return model.eval().requires_grad_(False)


def write_vision_checkpoint(folder: Path, model, files: dict) -> None:
    """config.json, the vision tower and projector tensors (fp16, transformers 5 in-memory names, which the
    loader accepts like the 4.x ones) and the processor files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tensors = {name: tensor.detach().to(device="cpu", dtype=torch.float16).contiguous()
               for name, tensor in model.state_dict().items()
               if name.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"))}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name, content in files.items():
        if callable(content):
            content(folder)
        else:
            (folder / name).write_text(json.dumps(content, indent=2))


def bench_family(name: str, root: Path, *, device: str = "cpu", dtype=torch.float32, reps: int = 3,
                 image_size: tuple[int, int] = (1024, 768), tiny: bool = False, synchronize=None) -> dict:
    """Build, write, load and time one family; returns its row."""
    from llava_pipeline import LlavaPipeline, VisionSettings

    model_class, config, files, feature_kwargs = BUILDERS[name](tiny)
    started = time.perf_counter()
    reference = build_vision_only(model_class, config, device, dtype, seed=0)
    folder = root / name
    write_vision_checkpoint(folder, reference, files)
    bits = {torch.float32: "32", torch.float16: "16", torch.bfloat16: "bf16"}[dtype]
    ours = LlavaPipeline.load(folder, VisionSettings(clip_device=device, projector_device=device, clip_bits=bits,
                                                     projector_bits=bits, cuda_graphs=True),
                              lm_hidden_size=config.text_config.hidden_size)
    bc.log(f"[{name}] built, wrote and loaded in {time.perf_counter() - started:.1f} s: {ours.describe()}")
    image = bc.photo_like_image(*image_size, seed=3)
    pixels = ours.plan.preprocess([image])[0]
    height, width = pixels.shape[-2:]
    kwargs = dict(feature_kwargs)
    if name in ("pixtral", "mistral3"):
        kwargs["image_sizes"] = torch.tensor([[height, width]])
    kwargs.update(kwargs.pop("per_image", lambda image, pixels: {})(image, pixels))
    device_pixels = pixels.to(device)

    def run_reference():
        features = reference.model.get_image_features(pixel_values=device_pixels.to(dtype), **kwargs).pooler_output
        if isinstance(features, (list, tuple)):  # one [rows, H] per image (OneVision's packed images)
            return features[0]
        return features.reshape(-1, features.shape[-1])  # every tile's rows (one tile: the image's rows)

    def run_ours():
        return ours.plan.pack(ours.encode_pixels(device_pixels), image.size)

    with torch.inference_mode():
        want, got = run_reference().float(), run_ours().float()
        timing = bc.time_interleaved({"reference": run_reference, "ours": run_ours}, reps, synchronize=synchronize)
    row = {
        "image": f"{image_size[0]}x{image_size[1]}", "pixels": f"{width}x{height}",
        "feature_rows": int(got.shape[0]), "prompt_positions": ours.prompt_positions(image.size),
        "reference_s": bc.rounded(timing.median("reference")), "ours_s": bc.rounded(timing.median("ours")),
        "ratio": bc.rounded(timing.ratio("ours", "reference")),
        "cpu_time_ratio": bc.rounded(timing.ratio("ours", "reference", cpu=True)),
        "max_abs_diff": float((got - want).abs().max()) if got.shape == want.shape else None,
        "tower_layers_run": f"{ours.tower.config.num_hidden_layers} of {int(config.vision_config.num_hidden_layers)}",
        "repetitions": reps,
    }
    bc.log(f"[{name}] {json.dumps(row)}")
    del reference, ours
    return row


def bench_families(names, root: Path, **kwargs) -> dict:
    return {name: bench_family(name, root, **kwargs) for name in names}


def parse_family_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BUILDERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}; known: {', '.join(BUILDERS)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", type=parse_family_list, default=list(BUILDERS),
                        help=f"comma-separated, from {','.join(BUILDERS)} (default: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--tiny", action="store_true", help="toy shapes: checks the script, numbers mean nothing")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else None
    result = {"device": args.device, "dtype": args.dtype, "tiny_shapes": args.tiny}
    with tempfile.TemporaryDirectory(prefix="llava_bench_families_") as tmp:
        result["families"] = bench_families(args.families, Path(tmp), device=args.device, reps=args.reps,
                                            dtype=getattr(torch, args.dtype), tiny=args.tiny, synchronize=synchronize)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
