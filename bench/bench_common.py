"""Shared pieces of bench_cpu.py and bench_gpu.py: model shapes, random LLaVA checkpoints, timing.

Nothing here downloads anything: configs are written out in code, weights are seeded random numbers and
the tokenizer is the tiny BPE one the tests train (tests/tiny_llava.py), with ``<image>`` and ``<pad>``
added. Checkpoints are written in the llava-hf layout (transformers 4.x key names, safetensors, fp16 as
llava-1.5-7b-hf ships), so ``LlavaPipeline.load`` reads them exactly as it reads a real one.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT / "tests", REPO_ROOT / "extensions" / "llava"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_MARKER = "<image>"
PAD_TOKEN = "<pad>"


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the final JSON line."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Shapes


def clip_l_336_vision_config(num_layers: int = 24, hidden: int = 1024, heads: int = 16, intermediate: int = 4096,
                             image_size: int = 336, patch: int = 14) -> dict:
    """openai/clip-vit-large-patch14-336 vision config (the LLaVA-1.5 tower) by default."""
    return {
        "model_type": "clip_vision_model", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": num_layers, "num_attention_heads": heads, "image_size": image_size,
        "patch_size": patch, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0, "num_channels": 3,
    }


def llama_text_config(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, kv_heads: int | None = None) -> dict:
    """A Llama text config; LLaVA-1.5-7B is hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32064."""
    return {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads, "intermediate_size": intermediate, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }


def llava_config(text: dict, vision: dict, tokenizer):
    """llava-hf LLaVA-1.5 config: layer -2, CLS dropped, gelu projector vision_hidden -> text_hidden;
    image and pad ids from ``tokenizer`` (see :func:`write_tokenizer`)."""
    from transformers import LlavaConfig

    image_token_id, pad_token_id = tokenizer.convert_tokens_to_ids([IMAGE_MARKER, PAD_TOKEN])
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return LlavaConfig(
        text_config=dict(text), vision_config=dict(vision), image_token_index=image_token_id,
        pad_token_id=pad_token_id, image_seq_length=patches, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def write_tokenizer(folder: Path):
    """Write the tests' tiny Llama-like BPE tokenizer plus ``<image>`` / ``<pad>`` into ``folder``.

    Returns the loaded ``AutoTokenizer`` (ids < ~740, so any Llama vocab size holds them).
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    import tiny_llava

    base = tiny_llava.train_tiny_tokenizer()
    base.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IMAGE_MARKER, PAD_TOKEN)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=base, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=PAD_TOKEN,
        model_max_length=4096,
    )
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------------------
# Models with seeded random weights, built without a slow CPU init


def build_llava(config, device: str | torch.device, dtype: torch.dtype, *, seed: int, vision_only: bool = False):
    """``LlavaForConditionalGeneration`` with seeded random weights, built on the meta device and then
    materialised on ``device`` (no default init pass). ``vision_only``: only the vision tower and the
    projector get memory; the language model stays on the meta device (enough for ``get_image_features``).

    Weights: N(0, 0.02²) (rounded to fp16, the on-disk precision), norm weights 1, biases N(0, 0.01²).
    """
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to(dtype=dtype)
    parts = [model.model.vision_tower, model.model.multi_modal_projector]
    if not vision_only:
        parts += [model.model.language_model, model.lm_head]
    fill_seeded_weights(parts, device, torch.Generator(device=device).manual_seed(seed))
    _reset_nonpersistent_buffers(model, device, vision_only)
    return model.eval().requires_grad_(False)


def fill_seeded_weights(parts, device, generator: torch.Generator) -> None:
    """Materialise each meta-device module of ``parts`` on ``device`` with N(0, 0.02²) weights rounded to
    fp16 (the on-disk precision), norm weights 1 (``*norm*`` modules, Pixtral's ``ln_pre``), biases N(0, 0.01²)."""
    for part in parts:
        part.to_empty(device=device)
        with torch.no_grad():
            for name, parameter in part.named_parameters():
                module_name = name.rsplit(".", 1)[0] if "." in name else ""
                if name.endswith("bias"):
                    parameter.normal_(0.0, 0.01, generator=generator)
                elif "norm" in module_name.rsplit(".", 1)[-1] or module_name.endswith("ln_pre"):
                    parameter.fill_(1.0)
                else:
                    parameter.normal_(0.0, 0.02, generator=generator)
                parameter.copy_(parameter.to(torch.float16))  # the checkpoint stores fp16


def _reset_nonpersistent_buffers(model, device, vision_only: bool) -> None:
    """``to_empty`` leaves computed buffers uninitialised: CLIP's position ids and Llama's rotary tables."""
    positions = model.model.vision_tower.embeddings.position_ids
    positions.copy_(torch.arange(positions.shape[-1], device=positions.device).expand_as(positions))
    if not vision_only:
        language_model = model.model.language_model
        language_model.rotary_emb = type(language_model.rotary_emb)(config=language_model.config, device=device)


# In-memory (transformers 5.x) names -> llava-hf 4.x on-disk names, as llava-hf/llava-1.5-7b-hf stores them.
_DISK_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def write_llava_hf_checkpoint(folder: Path, model, *, with_language_model: bool) -> None:
    """Write ``model`` as a llava-hf checkpoint (config, fp16 safetensors, processor configs) into
    ``folder``, which already holds the tokenizer (`write_tokenizer`).

    ``with_language_model=False`` writes only the vision tower and projector tensors (all that
    ``LlavaPipeline.load`` reads); the config still describes the full language model.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            continue
        for memory_prefix, disk_prefix in _DISK_PREFIXES:
            if name.startswith(memory_prefix):
                disk_name = disk_prefix + name[len(memory_prefix):]
                break
        else:
            raise KeyError(f"no llava-hf disk name for {name}")
        is_language = disk_name.startswith("language_model.")
        if is_language and not with_language_model:
            continue
        tensors[disk_name] = tensor.detach().to(device="cpu", dtype=torch.float16).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    vision = model.config.vision_config
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": vision.image_size, "width": vision.image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": vision.image_size},
    }, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({
        "image_token": IMAGE_MARKER, "num_additional_image_tokens": 1, "patch_size": vision.patch_size,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default",
    }, indent=2))


def text_only_causal_lm(llava_model):
    """A ``*ForCausalLM`` whose modules ARE the llava model's language model and lm_head (no copy):
    what webui's loader gives, with weights identical to the reference's."""
    from transformers import AutoModelForCausalLM

    text_config = llava_model.config.text_config
    with torch.device("meta"):
        causal_lm = AutoModelForCausalLM.from_config(text_config)
    causal_lm.model = llava_model.model.language_model
    causal_lm.lm_head = llava_model.lm_head
    return causal_lm.eval()


# ----------------------------------------------------------------------------------------------------------
# Inputs


def photo_like_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients plus seeded noise: compresses (PNG) and resamples like a photo, not like
    a flat test card."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, size=3)
    channels = [0.5 + 0.5 * np.sin(xs / (37.0 + 11 * c) + ys / (53.0 - 7 * c) + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) * 200 + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def png_data_url(image: Image.Image) -> str:
    """What webui sends for an uploaded image: ``data:image/png;base64,...``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def fit_text_tokens(tokenizer, template: str, target: int, filler_words: list[str]) -> str:
    """Fill ``template``'s ``{question}`` with words until the prompt has exactly ``target`` text tokens
    (BOS included, image markers excluded)."""
    words: list[str] = []
    best = template.format(question="")
    for index in range(4 * target):
        words.append(filler_words[index % len(filler_words)])
        text = template.format(question=" ".join(words) + "?")
        count = len(tokenizer(text.replace(IMAGE_MARKER, ""))["input_ids"])
        if count == target:
            return text
        if count > target:
            break
        best = text
    return best


FILLER_WORDS = ("what is the man on the left holding in his hand and why is the red car parked near the "
                "small green house behind the tree can you describe the picture in detail please").split()


def chat_prompt(tokenizer, turns: int) -> str:
    """A LLaVA-1.5 chat transcript with one image per earlier user turn and a text-only follow-up."""
    text = ""
    for turn in range(turns):
        text += (f"USER: {IMAGE_MARKER}\nWhat is in picture number {turn + 1}? ASSISTANT: The picture shows a "
                 f"small boat on the water next to a red house, and two people are standing on the road.</s>")
    return text + "USER: Which of these pictures is the brightest, and why do you think so? ASSISTANT:"


def extension_followup(pipeline, urls: list[str], parts, tokenizer, embed_tokens):
    """One turn as the extension's hooks run it when every image of the chat is cached: a content key per
    re-sent data URL (``source_digest``; the slot already carries the image size), lazy decoders that a
    cache hit never calls, and ``prepare``. Every turn gets new copies of the URL strings, as a request
    parsed from JSON does (re-sending the very same string objects is cheaper). Returns a zero-argument
    callable giving ``inputs_embeds`` ``[1, T, H]``; the first call fills the cache."""
    from llava_image_io import source_digest

    sizes = [pipeline.load_image(url, name=f"image {i + 1}").size for i, url in enumerate(urls)]
    loaders = [lambda url=url, i=i: pipeline.load_image(url, name=f"image {i + 1}") for i, url in enumerate(urls)]

    def turn():
        resent = [url[:1] + url[1:] for url in urls]  # equal text, new objects
        keys = [source_digest(url) for url in resent]
        return pipeline.prepare(parts, loaders, tokenizer, embed_tokens, add_bos=True, image_sizes=sizes,
                                keys=keys).inputs_embeds

    return turn


# ----------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Seconds per repetition of each candidate, measured interleaved (A, B, A, B, ...): wall-clock
    ``samples`` and this process's CPU time ``cpu_samples`` (all threads)."""

    samples: dict[str, list[float]]
    cpu_samples: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, numerator: str, denominator: str, *, cpu: bool = False) -> float:
        """Median over repetitions of the per-round ratio: a load spike slows both members of a round
        about equally, so paired ratios are steadier than a ratio of medians on a shared machine.
        ``cpu``: the same from CPU time, which other processes' load inflates less than wall time."""
        samples = self.cpu_samples if cpu else self.samples
        pairs = zip(samples[numerator], samples[denominator])
        return statistics.median(a / b for a, b in pairs)


def time_interleaved(candidates: dict[str, Callable[[], object]], repetitions: int, warmup: int = 1,
                     synchronize: Callable[[], None] | None = None,
                     before_each: Callable[[str], None] | None = None,
                     max_rounds: dict[str, int] | None = None) -> Timing:
    """Run every candidate ``warmup`` times, then ``repetitions`` rounds of each in turn; wall time each.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops;
    ``before_each(name)`` runs untimed before each call (e.g. to empty a cache); ``max_rounds[name]``
    limits a slow candidate to the first rounds (its ratios pair with the same rounds of the other).
    """
    max_rounds = max_rounds or {}
    sync = synchronize or (lambda: None)
    for name, function in candidates.items():
        for _ in range(warmup):
            if before_each:
                before_each(name)
            function()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    cpu_samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(repetitions):
        for name, function in candidates.items():
            if round_index >= max_rounds.get(name, repetitions):
                continue
            if before_each:
                before_each(name)
            sync()
            started, cpu_started = time.perf_counter(), time.process_time()
            function()
            sync()
            samples[name].append(time.perf_counter() - started)
            cpu_samples[name].append(time.process_time() - cpu_started)
    return Timing(samples, cpu_samples)


def rounded(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def targets_met(result: dict, targets: dict[str, float]) -> dict[str, bool | None]:
    """``{key: result[key] <= limit}`` for each target (None when the key was not measured)."""
    return {key: (None if result.get(key) is None else bool(result[key] <= limit)) for key, limit in targets.items()}
