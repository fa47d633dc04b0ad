"""Tiny seeded random LLaVA-OneVision checkpoints (``LlavaOnevisionForConditionalGeneration``), in the
layouts the hub and transformers 5.6 write.

The model is the real architecture at toy size: a SigLIP tower (``vision_use_head`` False, no CLS, 3 layers)
on 60 px tiles with 14 px patches (4x4 features per tile: like the real 384 / 14 = 27, the tile is not a
multiple of the patch), ``vision_feature_layer -1``, ``"full"`` features, the llava-hf projector
(``linear_1 -> gelu -> linear_2``), ``image_newline``, and a Qwen2 language model with tied embeddings
(as llava-onevision-qwen2-0.5b-ov-hf). ``image_grid_pinpoints`` are the real 6x6 grid of multiples of the tile
(384..2304 there, 60..360 here), read as (height, width) as transformers does, and ``vision_aspect_ratio``
is ``anyres_max_9``: a grid whose unpadded feature map exceeds 9 tiles' worth (by more than 1.1x per side)
is scaled down bilinearly, which any image bigger than a few tiles triggers at these sizes.

Written:

* ``onevision/``: the hub layout of llava-hf/llava-onevision-qwen2-*-hf (converted under transformers 4.x):
  4.x key names (``language_model.model.*``, ``vision_tower.vision_model.*``, ``image_newline``; the tied
  ``lm_head`` is not stored), a 4.x style ``config.json``, ``preprocessor_config.json``
  (``LlavaOnevisionImageProcessor``), ``processor_config.json``, ``chat_template.json``, and a Qwen2 tokenizer
  trained on the spot (byte-level BPE; ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<image>``,
  ``<video>`` added at V..V+4 as in the real vocabulary at 151643..151647) whose ``tokenizer_config.json``
  carries the plain Qwen chat template that prints ``message['content']`` as a string.
* ``onevision5/``: the same weights as transformers 5.6 ``save_pretrained`` writes them (5.x key names,
  sharded safetensors), the image-processor settings nested in ``processor_config.json`` and
  ``chat_template.jinja``, as ``ProcessorMixin.save_pretrained`` lays them out.

``LlavaOnevisionProcessor`` cannot be built in an environment without torchvision (its video processor
needs it; webui's environment has none), so the processor files are written from the same dicts the
processor would save, and tests build the reference processor with :func:`reference_processor`. This
module is test support, not a test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

import tiny_llava
import tiny_llava_next

TILE = 60
PATCH = 14
SIDE = TILE // PATCH  # 4 features per tile side (27 at 384 / 14)
BASE_TOKENS = SIDE * SIDE
PINPOINTS = [[TILE * rows, TILE * cols] for rows in range(1, 7) for cols in range(1, 7)]
VISION_ASPECT_RATIO = "anyres_max_9"
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
VISION_LAYERS = 3
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# The llava-onevision-qwen2-*-hf chat template: images first ("<image>" each), then the text, per message;
# "<|im_start|>role\n", "<|im_end|>\n". Shape as the hub processor renders it (decoded prompts in the
# transformers docs read "user\n\nWhat is shown…\nassistant\n"); the hub file itself was not seen.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The Qwen2 tokenizer's own template (content printed as a string), as Qwen tokenizer_config.json files carry.
QWEN_TOKENIZER_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyOnevision:
    """Paths and ids of the checkpoints written by :func:`write_tiny_onevision`."""

    root: Path
    hub: Path
    saved5: Path
    base_vocab: int
    image_token_id: int
    video_token_id: int
    eos_token_id: int
    padded_vocab: int
    tile: int = TILE
    side: int = SIDE
    base_tokens: int = BASE_TOKENS
    pinpoints: tuple = tuple(map(tuple, PINPOINTS))


def train_qwen_tokenizer() -> Tokenizer:
    """The Qwen2-style byte-level BPE of tests/tiny_llava_next.py (the pipeline transformers 5.6
    ``Qwen2Tokenizer`` rebuilds), without added tokens."""
    return tiny_llava_next.train_tiny_byte_level_tokenizer()


def _write_tokenizer(directory: Path, base: Tokenizer) -> int:
    """The Qwen2 tokenizer files plus special_tokens_map.json and added_tokens.json (transformers 4.x layout).
    Returns V (the id of ``<|endoftext|>``)."""
    vocab_size = tiny_llava_next.write_qwen_tokenizer(
        directory, base, ADDED_TOKENS, chat_template=QWEN_TOKENIZER_CHAT_TEMPLATE, padding_side="left",
        processor_class="LlavaOnevisionProcessor")
    entry = tiny_llava_next.special_token_entry
    tiny_llava.write_json(directory / "special_tokens_map.json", {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": entry("<|im_end|>"), "pad_token": entry("<|endoftext|>")})
    tiny_llava.write_json(directory / "added_tokens.json", {t: vocab_size + i for i, t in enumerate(ADDED_TOKENS)})
    return vocab_size


def build_model(base_vocab: int, seed: int):
    """A seeded random ``LlavaOnevisionForConditionalGeneration`` (fp32, eval)."""
    from transformers import AutoConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    padded = -(-(base_vocab + len(ADDED_TOKENS)) // 64) * 64
    text = AutoConfig.for_model(
        "qwen2", hidden_size=tiny_llava.TEXT_HIDDEN_SIZE, num_hidden_layers=tiny_llava.TEXT_LAYERS,
        num_attention_heads=tiny_llava.TEXT_HEADS, num_key_value_heads=tiny_llava.TEXT_KV_HEADS,
        intermediate_size=tiny_llava.TEXT_INTERMEDIATE_SIZE, vocab_size=padded,
        max_position_embeddings=tiny_llava.MAX_POSITION_EMBEDDINGS, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False, bos_token_id=base_vocab, eos_token_id=base_vocab + 2,
    )
    vision = SiglipVisionConfig(
        hidden_size=tiny_llava.VISION_HIDDEN_SIZE, intermediate_size=tiny_llava.VISION_INTERMEDIATE_SIZE,
        num_hidden_layers=VISION_LAYERS, num_attention_heads=tiny_llava.VISION_HEADS, image_size=TILE,
        patch_size=PATCH, vision_use_head=False, layer_norm_eps=1e-6,
    )
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=base_vocab + 3, video_token_index=base_vocab + 4,
        projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=VISION_ASPECT_RATIO, tie_word_embeddings=True,
    )
    model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32).eval()
    tiny_llava.randomize_(model, seed)
    model.tie_weights()
    return model


def image_processor_dict(with_class: bool = True) -> dict:
    """``preprocessor_config.json`` of the hub checkpoints, at the tiny tile size."""
    config = {
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": PINPOINTS, "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD,
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": TILE, "width": TILE},
    }
    if with_class:
        config.update(image_processor_type="LlavaOnevisionImageProcessor", processor_class="LlavaOnevisionProcessor")
    return dict(sorted(config.items()))


def processor_dict() -> dict:
    return {"image_token": "<image>", "num_image_tokens": BASE_TOKENS, "processor_class": "LlavaOnevisionProcessor",
            "video_token": "<video>", "vision_aspect_ratio": VISION_ASPECT_RATIO,
            "vision_feature_select_strategy": "full"}


def _hub_config(model) -> dict:
    config = tiny_llava_next._hf_config_dict(model, "LlavaOnevisionForConditionalGeneration", "4.45.0.dev0")
    config.update(video_token_index=model.config.video_token_id, vision_aspect_ratio=VISION_ASPECT_RATIO,
                  image_grid_pinpoints=PINPOINTS, use_image_newline_parameter=True)
    config["text_config"]["tie_word_embeddings"] = True
    config["tie_word_embeddings"] = True
    return dict(sorted(config.items()))


def _write_hub(directory: Path, model, tokenizer: Tokenizer) -> int:
    directory.mkdir(parents=True)
    tiny_llava.write_json(directory / "config.json", _hub_config(model))
    weights = {k: v for k, v in tiny_llava.hf4_state_dict(model).items() if k != "language_model.lm_head.weight"}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    base_vocab = _write_tokenizer(directory, tokenizer)
    tiny_llava.write_json(directory / "generation_config.json",
                          {"_from_model_config": True, "bos_token_id": base_vocab, "eos_token_id": base_vocab + 2})
    tiny_llava.write_json(directory / "chat_template.json", {"chat_template": ONEVISION_CHAT_TEMPLATE})
    tiny_llava.write_json(directory / "processor_config.json", processor_dict())
    tiny_llava.write_json(directory / "preprocessor_config.json", image_processor_dict())
    return base_vocab


def _write_saved5(directory: Path, model, hub: Path) -> None:
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil

    model.save_pretrained(directory, max_shard_size="300KB", safe_serialization=True)
    AutoTokenizer.from_pretrained(str(hub)).save_pretrained(directory)
    image_processor = LlavaOnevisionImageProcessorPil(**image_processor_dict(with_class=False))
    nested = json.loads(image_processor.to_json_string())
    nested["image_processor_type"] = "LlavaOnevisionImageProcessor"
    tiny_llava.write_json(directory / "processor_config.json", {**processor_dict(), "image_processor": nested})
    (directory / "chat_template.jinja").write_text(ONEVISION_CHAT_TEMPLATE, encoding="utf-8")


def write_tiny_onevision(root: Path, seed: int = 0) -> TinyOnevision:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_qwen_tokenizer()
    base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    model = build_model(base_vocab, seed + 50)
    hub, saved5 = root / "onevision", root / "onevision5"
    _write_hub(hub, model, tokenizer)
    _write_saved5(saved5, model, hub)
    return TinyOnevision(
        root=root, hub=hub, saved5=saved5, base_vocab=base_vocab, image_token_id=base_vocab + 3,
        video_token_id=base_vocab + 4, eos_token_id=base_vocab + 2,
        padded_vocab=model.config.text_config.vocab_size,
    )


# ----------------------------------------------------------------------------------------------------
# The reference


def reference_processor(folder: Path):
    """transformers' ``LlavaOnevisionProcessor`` for ``folder`` with the PIL image processor and no video
    processor (which needs torchvision, absent here; images never touch it)."""
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    class ProcessorWithoutVideo(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    folder = Path(folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings.pop("image_processor", None)
    settings.pop("processor_class", None)
    template_file = folder / "chat_template.json"
    template = (json.loads(template_file.read_text())["chat_template"] if template_file.is_file()
                else (folder / "chat_template.jinja").read_text())
    return ProcessorWithoutVideo(
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(str(folder)),
        tokenizer=AutoTokenizer.from_pretrained(str(folder)), video_processor=None, chat_template=template, **settings,
    )


def reference_model(folder: Path):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
