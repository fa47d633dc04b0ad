"""Tiny seeded random Aya Vision checkpoints (``AyaVisionForConditionalGeneration``), in the layouts the
hub and transformers 5.6 write.

The model is the real architecture at toy size: a SigLIP tower (``vision_use_head`` False, 3 layers) on
84 px tiles of 14 px patches (6x6 features per tile; the real one: 364 / 14 = 26), ``vision_feature_layer
-1``, ``"full"`` features, the Aya projector (2x2 pixel shuffle -> LayerNorm -> ``linear_1`` -> SwiGLU ->
``linear_2``, with an ``alignment_intermediate_size`` different from the text width, as in the real config),
so 3x3 = 9 image tokens per tile (169 in the real one), and a Cohere2 language model with tied embeddings,
four layers (three sliding-window, one global: the real pattern) and ``logit_scale`` 0.25, which the
reference's ``lm_head`` does NOT apply (``Cohere2ForCausalLM`` does). Images are cut into up to 12 tiles of
the grid closest to their aspect ratio, plus a thumbnail when there is more than one tile (GotOcr2 tiling).

Written:

* ``aya/``: the hub layout of CohereLabs/aya-vision-8b (transformers 4.50 era): 4.x key names
  (``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``; the tied
  ``lm_head`` is not stored), ``preprocessor_config.json`` (``GotOcr2ImageProcessor``, ``crop_to_patches``),
  ``processor_config.json`` (``patch_size`` 14 with ``downsample_factor`` 2), ``chat_template.json``
  (Cohere turns, images inline in content order, a fixed system preamble), and a Cohere-style tokenizer
  trained on the spot: byte-level BPE with single-digit splitting (the pipeline transformers 5.6
  ``CohereTokenizer`` rebuilds from vocab and merges), ``<PAD>``..``<EOP_TOKEN>`` at ids 0-7, turn and image
  tokens added at the end (255000.. in the real vocabulary; ``<|IMG_PATCH|>`` is the image token), BOS
  added by the post-processor. ``TILE_1``, ``TILE_GLOBAL``… are ordinary text, as in the processor.
* ``aya5/``: the same weights as transformers 5.6 ``save_pretrained`` writes them, plus what
  ``AyaVisionProcessor.save_pretrained`` writes (image-processor settings nested in
  ``processor_config.json``, whose ``patch_size`` is then 28, ``chat_template.jinja``).

This module is test support, not a test.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import tiny_llava
import tiny_llava_next

TILE = 84
PATCH = 14
DOWNSAMPLE = 2
TOKENS_PER_TILE = (TILE // (PATCH * DOWNSAMPLE)) ** 2  # 9 (169 in the real model)
MAX_PATCHES = 12
ALIGNMENT_INTERMEDIATE = 96  # SwiGLU: linear_1 -> 96, split into 2 x 48, linear_2 48 -> text width
TEXT_LAYERS = 4
LOGIT_SCALE = 0.25
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
VISION_LAYERS = 3

SPECIAL_FIRST = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>"]
ADDED_LAST = ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
              "<|SYSTEM_TOKEN|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "<|IMG_PATCH|>"]
TOKENIZER_VOCAB_SIZE = 520

# Cohere-style turns; every item of a message's content in order ("<image>" for an image). The real
# template opens with a long system preamble; a short fixed one keeps the shape (a system turn always first).
AYA_CHAT_TEMPLATE = (
    "{{ bos_token }}{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># System Preamble\nYou are Aya Vision, a helpful assistant.' }}"
    "{% if messages[0]['role'] == 'system' %}{{ '\n\n# Developer Preamble\n' }}"
    "{% for item in messages[0]['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{{ '<|END_OF_TURN_TOKEN|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ item['text'] }}{% endgeneration %}{% endfor %}{{ '<|END_OF_TURN_TOKEN|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyAya:
    """Paths and ids of the checkpoints written by :func:`write_tiny_aya`."""

    root: Path
    hub: Path
    saved5: Path
    vocab: int
    """Tokenizer size incl. the added tokens; also the text vocab_size (no padding rows)."""
    image_token_id: int
    bos_token_id: int
    eos_token_id: int
    tile: int = TILE
    tokens_per_tile: int = TOKENS_PER_TILE
    max_patches: int = MAX_PATCHES
    logit_scale: float = LOGIT_SCALE


def _corpus() -> list[str]:
    lines = tiny_llava._training_corpus()
    rng = random.Random(11)
    questions = ["What is in the image?", "Describe the picture.", "What color is the car?", "Read the text."]
    for _ in range(300):
        tiles = "".join(f"TILE_{i}<|IMG_PATCH|>" for i in range(1, rng.randint(2, 13)))
        lines.append(f"<|START_OF_TURN_TOKEN|><|USER_TOKEN|><|START_OF_IMG|>{tiles}TILE_GLOBAL<|IMG_PATCH|>"
                     f"<|END_OF_IMG|>{rng.choice(questions)}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
                     f"<|CHATBOT_TOKEN|>I see {rng.randint(0, 2025)} things.<|END_OF_TURN_TOKEN|>")
    return lines


def train_cohere_tokenizer() -> Tokenizer:
    """A Cohere-style byte-level BPE with its special tokens at 0-7, the turn and image tokens after the
    learned vocabulary, and a post-processor that prepends ``<BOS_TOKEN>``."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL_FIRST)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    base = tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in ADDED_LAST])
    for offset, token in enumerate(ADDED_LAST):
        if tokenizer.token_to_id(token) != base + offset:
            raise RuntimeError(f"added token {token} did not get id {base + offset}")
    bos = SPECIAL_FIRST.index("<BOS_TOKEN>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<BOS_TOKEN>:0 $A:0", pair="<BOS_TOKEN>:0 $A:0 <BOS_TOKEN>:1 $B:1", special_tokens=[("<BOS_TOKEN>", bos)])
    return tokenizer


def _write_tokenizer(directory: Path, tokenizer: Tokenizer) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (hub layout)."""
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)

    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    tiny_llava.write_json(directory / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(vocab[t]): entry(t) for t in SPECIAL_FIRST + ADDED_LAST},
        "bos_token": "<BOS_TOKEN>",
        "clean_up_tokenization_spaces": False,
        "cls_token": "<CLS>",
        "eos_token": "<|END_OF_TURN_TOKEN|>",
        "legacy": True,
        "mask_token": "<MASK_TOKEN>",
        "model_max_length": tiny_llava.MAX_POSITION_EMBEDDINGS,
        "pad_token": "<PAD>",
        "padding_side": "left",
        "sep_token": "<SEP>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "CohereTokenizer",
        "unk_token": "<UNK>",
        "use_default_system_prompt": False,
    })
    tiny_llava.write_json(directory / "special_tokens_map.json", {
        "bos_token": entry("<BOS_TOKEN>"), "cls_token": entry("<CLS>"), "eos_token": entry("<|END_OF_TURN_TOKEN|>"),
        "mask_token": entry("<MASK_TOKEN>"), "pad_token": entry("<PAD>"), "sep_token": entry("<SEP>"),
        "unk_token": entry("<UNK>")})


def build_model(tokenizer: Tokenizer, seed: int):
    """A seeded random ``AyaVisionForConditionalGeneration`` (fp32, eval)."""
    from transformers import AutoConfig, AyaVisionConfig, AyaVisionForConditionalGeneration, SiglipVisionConfig

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    text = AutoConfig.for_model(
        "cohere2", hidden_size=tiny_llava.TEXT_HIDDEN_SIZE, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=tiny_llava.TEXT_HEADS, num_key_value_heads=tiny_llava.TEXT_KV_HEADS,
        intermediate_size=tiny_llava.TEXT_INTERMEDIATE_SIZE, vocab_size=vocab,
        max_position_embeddings=tiny_llava.MAX_POSITION_EMBEDDINGS, layer_norm_eps=1e-5, logit_scale=LOGIT_SCALE,
        rope_theta=50000.0, sliding_window=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.token_to_id("<BOS_TOKEN>"), eos_token_id=tokenizer.token_to_id("<|END_OF_TURN_TOKEN|>"),
        pad_token_id=tokenizer.token_to_id("<PAD>"),
    )
    vision = SiglipVisionConfig(
        hidden_size=tiny_llava.VISION_HIDDEN_SIZE, intermediate_size=tiny_llava.VISION_INTERMEDIATE_SIZE,
        num_hidden_layers=VISION_LAYERS, num_attention_heads=tiny_llava.VISION_HEADS, image_size=TILE,
        patch_size=PATCH, vision_use_head=False, layer_norm_eps=1e-6,
    )
    config = AyaVisionConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.token_to_id("<|IMG_PATCH|>"),
        downsample_factor=DOWNSAMPLE, adapter_layer_norm_eps=1e-6, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True,
        alignment_intermediate_size=ALIGNMENT_INTERMEDIATE,
    )
    model = AyaVisionForConditionalGeneration(config).to(torch.float32).eval()
    tiny_llava.randomize_(model, seed)
    model.tie_weights()
    return model


def image_processor_dict(with_class: bool = True) -> dict:
    config = {
        "crop_to_patches": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD, "max_patches": MAX_PATCHES, "min_patches": 1,
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": TILE, "width": TILE},
    }
    if with_class:
        config.update(image_processor_type="GotOcr2ImageProcessor", processor_class="AyaVisionProcessor")
    return dict(sorted(config.items()))


def processor_dict() -> dict:
    """processor_config.json of the hub checkpoint (patch size before the downsampling, as the
    processor's ``__init__`` takes it)."""
    return {"downsample_factor": DOWNSAMPLE, "end_of_img_token": "<|END_OF_IMG|>", "image_token": "<image>",
            "img_line_break_token": "<|IMG_LINE_BREAK|>", "img_patch_token": "<|IMG_PATCH|>", "img_size": TILE,
            "patch_size": PATCH, "processor_class": "AyaVisionProcessor", "start_of_img_token": "<|START_OF_IMG|>",
            "tile_global_token": "TILE_GLOBAL", "tile_token": "TILE"}


def _hub_config(model) -> dict:
    config = tiny_llava_next._hf_config_dict(model, "AyaVisionForConditionalGeneration", "4.50.0.dev0")
    config.update(downsample_factor=DOWNSAMPLE, adapter_layer_norm_eps=1e-6,
                  alignment_intermediate_size=ALIGNMENT_INTERMEDIATE, tie_word_embeddings=True)
    config["text_config"]["tie_word_embeddings"] = True
    config["text_config"]["logit_scale"] = LOGIT_SCALE
    return dict(sorted(config.items()))


def _write_hub(directory: Path, model, tokenizer: Tokenizer) -> None:
    directory.mkdir(parents=True)
    tiny_llava.write_json(directory / "config.json", _hub_config(model))
    weights = {k: v for k, v in tiny_llava.hf4_state_dict(model).items() if k != "language_model.lm_head.weight"}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(directory, tokenizer)
    tiny_llava.write_json(directory / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": tokenizer.token_to_id("<BOS_TOKEN>"),
        "eos_token_id": tokenizer.token_to_id("<|END_OF_TURN_TOKEN|>"), "pad_token_id": tokenizer.token_to_id("<PAD>")})
    tiny_llava.write_json(directory / "chat_template.json", {"chat_template": AYA_CHAT_TEMPLATE})
    tiny_llava.write_json(directory / "processor_config.json", processor_dict())
    tiny_llava.write_json(directory / "preprocessor_config.json", image_processor_dict())


def _write_saved5(directory: Path, model, hub: Path) -> None:
    from transformers import AutoTokenizer, AyaVisionProcessor, GotOcr2ImageProcessorPil

    model.save_pretrained(directory, max_shard_size="300KB", safe_serialization=True)
    settings = processor_dict()
    settings.pop("processor_class")
    AyaVisionProcessor(
        image_processor=GotOcr2ImageProcessorPil(**image_processor_dict(with_class=False)),
        tokenizer=AutoTokenizer.from_pretrained(str(hub)), chat_template=AYA_CHAT_TEMPLATE, **settings,
    ).save_pretrained(directory)


def write_tiny_aya(root: Path, seed: int = 0) -> TinyAya:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_cohere_tokenizer()
    # With seed + 60 the random model ends most replies at once (<|END_OF_TURN_TOKEN|> first); + 62 talks.
    model = build_model(tokenizer, seed + 62)
    hub, saved5 = root / "aya", root / "aya5"
    _write_hub(hub, model, tokenizer)
    _write_saved5(saved5, model, hub)
    return TinyAya(
        root=root, hub=hub, saved5=saved5, vocab=tokenizer.get_vocab_size(with_added_tokens=True),
        image_token_id=tokenizer.token_to_id("<|IMG_PATCH|>"), bos_token_id=tokenizer.token_to_id("<BOS_TOKEN>"),
        eos_token_id=tokenizer.token_to_id("<|END_OF_TURN_TOKEN|>"),
    )


# ----------------------------------------------------------------------------------------------------
# The reference


def reference_processor(folder: Path):
    """transformers' ``AyaVisionProcessor`` with the PIL image processor."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder), backend="pil")


def reference_model(folder: Path):
    from transformers import AyaVisionForConditionalGeneration

    return AyaVisionForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
