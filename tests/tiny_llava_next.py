"""Tiny seeded random LLaVA-NeXT (1.6) and other Llava-family checkpoints, in their real on-disk formats.

Companion of tests/tiny_llava.py (whose tokenizer, sizes, writers and key mapping are reused). Written:

* ``clip_next/``: the CLIP tower that the original 1.6 configs name in ``mm_vision_tower``. Its weights
  DIFFER from the tower stored in the 1.6 checkpoint (1.6 fine-tuned its tower, ``unfreeze_mm_vision_tower``),
  so a test can tell which one was used.
* ``next_hf/``: llava-hf ``LlavaNextForConditionalGeneration`` (``model_type "llava_next"``) as converted under
  transformers 4.x: 4.x key names incl. ``image_newline``, ``image_grid_pinpoints`` read as (height, width),
  ``LlavaNextImageProcessor`` preprocessor config (with the hub's ``aspect_ratio_setting``), processor config,
  chat template, ``<image>``/``<pad>`` added tokens.
* ``next_hf5/``: the same model as transformers 5.6 ``save_pretrained`` writes a freshly built one (sharded,
  tower keys without ``vision_model.``) plus what ``LlavaNextProcessor.save_pretrained`` writes (image
  processor settings nested in ``processor_config.json``, ``chat_template.jinja``).
* ``next_orig/``: the same weights in the ORIGINAL 1.6 format: flat config, ``model_type "llava"``,
  ``image_aspect_ratio "anyres"``, the same ``image_grid_pinpoints`` list (read as (width, height) there),
  ``mm_patch_merge_type "spatial_unpad"``, ``model.image_newline``, the fine-tuned tower under
  ``model.vision_tower.vision_tower.vision_model.*``; vocabulary V (no image token); sharded safetensors.
* ``next_orig_mistral/``: the same weights as ``llava_mistral`` (Mistral text config, no sliding window,
  rope_theta 10000 so the Llama-text reference above stays exact for it).
* ``bakllava/``: llava-hf ``LlavaForConditionalGeneration`` on a Mistral text model, ``[INST]`` template,
  CLIP center-crop preprocessing (llava-hf/bakLlava-v1-hf style).
* ``qwen_siglip/``: llava-hf Llava on a Qwen2 text model and a SigLIP tower (``siglip_vision_model``,
  ``vision_use_head`` False, no CLS), ``vision_feature_layer -1``, ``"full"``, a byte-level BPE tokenizer
  whose ``<image>`` id is V+3 (after ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), chatml template
  (llava-interleave-qwen style).
* ``multilayer/``: llava-hf Llava (Llama) with ``vision_feature_layer [-2, -1]``: the projector input is twice
  the tower width.

Tile geometry of the NeXT kinds: 56 px tiles of 4x4 patches (14 px), pinpoints = the real ones / 6. Every
tensor comes from one seed per kind. This module is test support, not a test.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import tiny_llava
from tiny_llava import (
    IMAGE_SIZE,
    MAX_POSITION_EMBEDDINGS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PATCH_SIZE,
    RMS_NORM_EPS,
    TEXT_HEADS,
    TEXT_HIDDEN_SIZE,
    TEXT_INTERMEDIATE_SIZE,
    TEXT_KV_HEADS,
    TEXT_LAYERS,
    UNK,
    VISION_FEATURE_LAYER,
    VISION_HEADS,
    VISION_HIDDEN_SIZE,
    VISION_INTERMEDIATE_SIZE,
    padded_vocab_size,
)

# The real LLaVA-NeXT pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]] at 56 px tiles.
TINY_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SIDE = IMAGE_SIZE // PATCH_SIZE  # feature-map side of one tile (4; 24 at 336/14)
BASE_TOKENS = SIDE * SIDE  # CLS dropped

SIGLIP_LAYERS = 2
QWEN_VOCAB_SIZE = 420  # requested byte-level BPE size (256 byte symbols + merges)
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

# llava-v1.6-mistral-7b-hf's chat template, as its processor prints it (third-party write-up; hub file unseen).
MISTRAL_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Vicuna-style NeXT template: the original llava_v1 system prompt, "USER: " / "ASSISTANT:" turns.
VICUNA_NEXT_CHAT_TEMPLATE = (
    "{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human\\'s questions. ' }}"
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-interleave-qwen style chatml template.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyNextCheckpoints:
    """Paths and ids of the checkpoints written by `write_tiny_next_checkpoints`."""

    root: Path
    clip_next: Path
    next_hf: Path
    next_hf5: Path
    next_orig: Path
    next_orig_mistral: Path
    bakllava: Path
    qwen_siglip: Path
    multilayer: Path
    base_vocab: int
    """V of the Llama-style tokenizer: vocab of the original 1.6 checkpoints; ``<image>`` = V in llava-hf."""
    padded_vocab: int
    image_token_id: int
    qwen_base_vocab: int
    qwen_image_token_id: int
    qwen_padded_vocab: int
    tile: int
    patch_size: int
    side: int
    base_tokens: int
    grid_pinpoints: list
    image_mean: tuple
    image_std: tuple


# ----------------------------------------------------------------------------------------------------
# Weights


def _llama_text_config(vocab: int, model_type: str = "llama", **extra):
    from transformers import AutoConfig

    fields = dict(
        hidden_size=TEXT_HIDDEN_SIZE, num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS, intermediate_size=TEXT_INTERMEDIATE_SIZE, vocab_size=vocab,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS, rms_norm_eps=RMS_NORM_EPS, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0,
    )
    fields.update(extra)
    return AutoConfig.for_model(model_type, **fields)


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{k: v for k, v in tiny_llava._vision_config_dict().items() if k != "model_type"})


def _siglip_vision_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE, intermediate_size=VISION_INTERMEDIATE_SIZE, num_hidden_layers=SIGLIP_LAYERS,
        num_attention_heads=VISION_HEADS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False,
    )




def _hf_config_dict(model, architecture: str, transformers_version: str) -> dict:
    """config.json as the 4.x conversion scripts left it: top-level fields plus text/vision sub-dicts."""
    config = model.config.to_dict()
    keep_top = {
        "image_token_index", "model_type", "pad_token_id", "projector_hidden_act", "tie_word_embeddings",
        "vision_feature_layer", "vision_feature_select_strategy", "image_grid_pinpoints",
        "use_image_newline_parameter", "image_seq_length",
    }
    out = {"architectures": [architecture], "ignore_index": -100}
    out.update({k: v for k, v in config.items() if k in keep_top and v is not None})
    out["image_token_index"] = model.config.image_token_id
    text = model.config.text_config.to_dict()
    vision = model.config.vision_config.to_dict()
    drop = {"architectures", "dtype", "torch_dtype", "transformers_version", "id2label", "label2id", "output_attentions",
            "output_hidden_states", "return_dict", "chunk_size_feed_forward", "problem_type", "tokenizer_class",
            "is_encoder_decoder", "_name_or_path", "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
            "finetuning_task", "prefix", "sep_token_id", "task_specific_params", "decoder_start_token_id",
            "pruned_heads", "tf_legacy_loss", "use_bfloat16", "torchscript", "is_decoder", "layer_types", "rope_parameters"}
    out["text_config"] = {k: v for k, v in sorted(text.items()) if k not in drop}
    text_rope = model.config.text_config.rope_parameters or {}
    if "rope_theta" in text_rope:
        out["text_config"]["rope_theta"] = text_rope["rope_theta"]
    out["text_config"]["torch_dtype"] = "float32"
    out["vision_config"] = {k: v for k, v in sorted(vision.items()) if k not in drop}
    out["torch_dtype"] = "float32"
    out["transformers_version"] = transformers_version
    out["vocab_size"] = model.config.text_config.vocab_size
    return dict(sorted(out.items()))


def _write_hf_dir(directory: Path, model, architecture: str, *, tokenizer: Tokenizer, added: list[str],
                  pad_token: str | None, chat_template: str, processor_config: dict, preprocessor_config: dict,
                  generation: dict, tokenizer_writer=None) -> None:
    directory.mkdir(parents=True)
    tiny_llava.write_json(directory / "config.json", _hf_config_dict(model, architecture, "4.40.0.dev0"))
    save_file(tiny_llava.hf4_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    tiny_llava.write_json(directory / "generation_config.json", {"_from_model_config": True, **generation})
    if tokenizer_writer is None:
        tiny_llava._write_tokenizer(directory, tokenizer, added, pad_token=pad_token,
                                    extra_config={"processor_class": processor_config["processor_class"]})
    else:
        tokenizer_writer(directory)
    tiny_llava.write_json(directory / "chat_template.json", {"chat_template": chat_template})
    tiny_llava.write_json(directory / "processor_config.json", processor_config)
    tiny_llava.write_json(directory / "preprocessor_config.json", preprocessor_config)


# ----------------------------------------------------------------------------------------------------
# LLaVA-NeXT


def build_tiny_next(base_vocab: int, seed: int):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        text_config=_llama_text_config(padded_vocab_size(base_vocab)),
        vision_config=_clip_vision_config(),
        image_token_index=base_vocab,
        pad_token_id=base_vocab + 1,
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        use_image_newline_parameter=True,
    )
    model = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
    tiny_llava.randomize_(model, seed)
    return model


def _write_next_hf(directory: Path, model, tokenizer: Tokenizer, base_vocab: int) -> None:
    _write_hf_dir(
        directory, model, "LlavaNextForConditionalGeneration", tokenizer=tokenizer, added=["<image>", "<pad>"],
        pad_token="<pad>", chat_template=VICUNA_NEXT_CHAT_TEMPLATE,
        processor_config={"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": PATCH_SIZE,
                          "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"},
        preprocessor_config=tiny_llava.clip_image_processor_config(
            "LlavaNextImageProcessor", "LlavaNextProcessor", do_pad=True, aspect_ratio_setting="anyres",
            image_grid_pinpoints=TINY_PINPOINTS),
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": base_vocab + 1},
    )


def _write_next_hf5(directory: Path, model, hf_dir: Path) -> None:
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor

    model.save_pretrained(directory, max_shard_size="200KB", safe_serialization=True)
    LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil.from_pretrained(hf_dir),
        tokenizer=AutoTokenizer.from_pretrained(hf_dir), patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        chat_template=VICUNA_NEXT_CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
    ).save_pretrained(directory)


def _write_clip_next(directory: Path, model, seed: int) -> None:
    """The pre-fine-tuning tower named by mm_vision_tower: the checkpoint's tower plus seeded noise."""
    directory.mkdir(parents=True)
    config = {"architectures": ["CLIPVisionModel"], **tiny_llava._vision_config_dict(),
              "torch_dtype": "float32", "transformers_version": "4.37.2"}
    tiny_llava.write_json(directory / "config.json", config)
    generator = torch.Generator().manual_seed(seed)
    weights = {
        name: (tensor + 0.05 * torch.randn(tensor.shape, generator=generator)).contiguous()
        for name, tensor in tiny_llava.vision_tower_state_dict(model).items()
    }
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tiny_llava._write_clip_preprocessor_config(directory)


def _write_next_orig(directory: Path, model, tokenizer: Tokenizer, clip_dir: Path, base_vocab: int,
                     *, mistral: bool) -> None:
    """Original 1.6 (liuhaotian/llava-v1.6-*): flat config, 2 safetensors shards + index."""
    directory.mkdir(parents=True)
    config = {
        "_name_or_path": "./checkpoints/llava-v1.6-tiny",
        "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if mistral else "llava",
        **tiny_llava._original_llm_config(base_vocab),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": 10000.0,
        "freeze_mm_mlp_adapter": False,
        "freeze_mm_vision_resampler": False,
        "image_aspect_ratio": "anyres",
        "image_crop_resolution": 224,
        "image_grid_pinpoints": TINY_PINPOINTS,
        "image_split_resolution": 224,
        "mm_hidden_size": VISION_HIDDEN_SIZE,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": VISION_FEATURE_LAYER,
        "mm_vision_tower": str(clip_dir.resolve()),
        "mm_vision_tower_lr": 2e-06,
        "tokenizer_model_max_length": MAX_POSITION_EMBEDDINGS,
        "tokenizer_padding_side": "right",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": True,
        "use_mm_proj": True,
    }
    if mistral:
        config.pop("pretraining_tp", None)
        config["sliding_window"] = None
    tiny_llava.write_json(directory / "config.json", dict(sorted(config.items())))
    language = tiny_llava.original_language_state_dict(model, base_vocab)
    projector = model.model.multi_modal_projector
    rest = {
        "model.mm_projector.0.weight": projector.linear_1.weight,
        "model.mm_projector.0.bias": projector.linear_1.bias,
        "model.mm_projector.2.weight": projector.linear_2.weight,
        "model.mm_projector.2.bias": projector.linear_2.bias,
        "model.image_newline": model.model.image_newline,
    }
    rest = {name: tensor.detach().clone().contiguous() for name, tensor in rest.items()}
    for name, tensor in tiny_llava.vision_tower_state_dict(model).items():
        rest["model.vision_tower.vision_tower." + name] = tensor
    first = {name: tensor for name, tensor in language.items() if name.startswith(("model.embed_tokens.", "model.layers.0."))}
    second = {name: tensor for name, tensor in language.items() if name not in first}
    second.update(rest)
    weight_map, total = {}, 0
    for index, shard in enumerate((first, second), start=1):
        shard_name = f"model-{index:05d}-of-00002.safetensors"
        save_file(shard, str(directory / shard_name), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = shard_name
            total += tensor.numel() * tensor.element_size()
    tiny_llava.write_json(directory / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    tiny_llava._write_tokenizer(directory, tokenizer, [], pad_token=UNK)
    tiny_llava.write_json(directory / "generation_config.json",
                {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})


# ----------------------------------------------------------------------------------------------------
# Llava on other language models and towers


def build_tiny_llava_variant(text_config, vision_config, *, image_token_id: int, pad_token_id: int | None,
                             layer, strategy: str, seed: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=text_config, vision_config=vision_config, image_token_index=image_token_id,
        pad_token_id=pad_token_id, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", tie_word_embeddings=False,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    tiny_llava.randomize_(model, seed)
    return model


def _qwen_corpus() -> list[str]:
    lines = tiny_llava._training_corpus()
    rng = random.Random(99)
    questions = ["What is in the image?", "Describe the picture.", "What color is the car?", "Where is the cat?"]
    for _ in range(200):
        lines.append(f"<|im_start|>user\n<image>\n{rng.choice(questions)}<|im_end|>\n<|im_start|>assistant\n"
                     f"I see {rng.randint(0, 99)} things.<|im_end|>")
    return lines


def train_tiny_byte_level_tokenizer() -> Tokenizer:
    """A Qwen2-like byte-level BPE: transformers 5.6 ``Qwen2Tokenizer`` rebuilds exactly this pipeline
    (NFC, Qwen's split regex, ByteLevel without its own regex) from vocab and merges. The chatml and image
    tokens are added afterwards as special tokens, so ``<image>`` lands at V+3."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=QWEN_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(_qwen_corpus(), trainer=trainer)
    return tokenizer


def special_token_entry(content: str) -> dict:
    """An ``added_tokens_decoder`` / ``special_tokens_map.json`` entry of a special token, as the hub writes it."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def write_qwen_tokenizer(directory: Path, tokenizer: Tokenizer, added_tokens=QWEN_ADDED, **config) -> int:
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json (Qwen2 layout, transformers 4.x;
    ``config`` adds or replaces keys) with ``added_tokens`` as special tokens after the trained vocabulary.
    Returns the first added token's id (``<|endoftext|>``)."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    base = tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added_tokens])
    for offset, token in enumerate(added_tokens):
        if tokenizer.token_to_id(token) != base + offset:
            raise RuntimeError(f"added token {token} did not get id {base + offset}")
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    tiny_llava.write_json(directory / "vocab.json", dict(sorted(vocab.items(), key=lambda item: item[1])))
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join((" ".join(m) if isinstance(m, list) else m) + "\n" for m in merges),
        encoding="utf-8")
    tiny_llava.write_json(directory / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(base + i): special_token_entry(token) for i, token in enumerate(added_tokens)},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": "<|endoftext|>",
        "processor_class": "LlavaProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        **config,
    })
    return base


def _write_variants(root: Path, tokenizer: Tokenizer, base_vocab: int, seed: int) -> dict:
    """bakllava (Mistral text), qwen_siglip (Qwen2 + SigLIP, "full", layer -1), multilayer ([-2, -1])."""
    padded = padded_vocab_size(base_vocab)
    llama_processor = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": PATCH_SIZE,
                       "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}
    llama_generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": base_vocab + 1}

    bakllava = build_tiny_llava_variant(
        _llama_text_config(padded, "mistral", sliding_window=4096), _clip_vision_config(),
        image_token_id=base_vocab, pad_token_id=base_vocab + 1, layer=VISION_FEATURE_LAYER, strategy="default",
        seed=seed + 20)
    _write_hf_dir(root / "bakllava", bakllava, "LlavaForConditionalGeneration", tokenizer=tokenizer,
                  added=["<image>", "<pad>"], pad_token="<pad>", chat_template=MISTRAL_NEXT_CHAT_TEMPLATE,
                  processor_config=llama_processor,
                  preprocessor_config=tiny_llava.clip_image_processor_config("CLIPImageProcessor", "LlavaProcessor"),
                  generation=llama_generation)

    multilayer = build_tiny_llava_variant(
        _llama_text_config(padded), _clip_vision_config(), image_token_id=base_vocab, pad_token_id=base_vocab + 1,
        layer=[-2, -1], strategy="default", seed=seed + 30)
    _write_hf_dir(root / "multilayer", multilayer, "LlavaForConditionalGeneration", tokenizer=tokenizer,
                  added=["<image>", "<pad>"], pad_token="<pad>", chat_template=tiny_llava.LLAVA_15_HF_CHAT_TEMPLATE,
                  processor_config=llama_processor,
                  preprocessor_config=tiny_llava.clip_image_processor_config("CLIPImageProcessor", "LlavaProcessor"),
                  generation=llama_generation)

    qwen_tokenizer = train_tiny_byte_level_tokenizer()
    qwen_base = qwen_tokenizer.get_vocab_size(with_added_tokens=True)
    qwen_image = qwen_base + QWEN_ADDED.index("<image>")
    qwen_padded = -(-(qwen_base + len(QWEN_ADDED)) // 64) * 64
    qwen = build_tiny_llava_variant(
        _llama_text_config(qwen_padded, "qwen2", bos_token_id=None, eos_token_id=qwen_base + 2,
                           pad_token_id=None, use_sliding_window=False),
        _siglip_vision_config(), image_token_id=qwen_image, pad_token_id=None, layer=-1, strategy="full",
        seed=seed + 40)
    _write_hf_dir(root / "qwen_siglip", qwen, "LlavaForConditionalGeneration", tokenizer=qwen_tokenizer, added=[],
                  pad_token=None, chat_template=CHATML_CHAT_TEMPLATE,
                  processor_config={"image_token": "<image>", "num_additional_image_tokens": 0,
                                    "patch_size": PATCH_SIZE, "processor_class": "LlavaProcessor",
                                    "vision_feature_select_strategy": "full"},
                  preprocessor_config={
                      "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
                      "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
                      "image_std": [0.5, 0.5, 0.5], "processor_class": "LlavaProcessor", "resample": 3,
                      "rescale_factor": 1 / 255, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                  },
                  generation={"bos_token_id": None, "eos_token_id": qwen_base + 2},
                  tokenizer_writer=lambda directory: write_qwen_tokenizer(directory, qwen_tokenizer))
    return {"qwen_base_vocab": qwen_base, "qwen_image_token_id": qwen_image, "qwen_padded_vocab": qwen_padded}


# ----------------------------------------------------------------------------------------------------


def write_tiny_next_checkpoints(root: Path, seed: int = 0) -> TinyNextCheckpoints:
    """Write every kind under `root` (created; must not already hold them)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_llava.train_tiny_tokenizer()
    base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    model = build_tiny_next(base_vocab, seed + 10)
    paths = {name: root / name for name in (
        "clip_next", "next_hf", "next_hf5", "next_orig", "next_orig_mistral", "bakllava", "qwen_siglip", "multilayer")}
    _write_clip_next(paths["clip_next"], model, seed + 11)
    _write_next_hf(paths["next_hf"], model, tokenizer, base_vocab)
    _write_next_hf5(paths["next_hf5"], model, paths["next_hf"])
    _write_next_orig(paths["next_orig"], model, tokenizer, paths["clip_next"], base_vocab, mistral=False)
    _write_next_orig(paths["next_orig_mistral"], model, tokenizer, paths["clip_next"], base_vocab, mistral=True)
    qwen = _write_variants(root, tokenizer, base_vocab, seed)
    return TinyNextCheckpoints(
        root=root, **paths, base_vocab=base_vocab, padded_vocab=padded_vocab_size(base_vocab),
        image_token_id=base_vocab, **qwen, tile=IMAGE_SIZE, patch_size=PATCH_SIZE, side=SIDE,
        base_tokens=BASE_TOKENS, grid_pinpoints=TINY_PINPOINTS,
        image_mean=tuple(OPENAI_CLIP_MEAN), image_std=tuple(OPENAI_CLIP_STD),
    )


# ----------------------------------------------------------------------------------------------------
# An independent, test-side implementation of ORIGINAL LLaVA-1.6 anyres (llava-formats.md §2.9), written
# from the description of `llava/mm_utils.py` and `llava/model/llava_arch.py`; it shares no code with the
# extension. Sizes are (width, height) and pinpoints are read as (width, height), as the original does.


def original_best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    width, height = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_w, cand_h in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    return best


def original_resize_and_pad(image, target: tuple[int, int]):
    import math

    from PIL import Image

    width, height = image.size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_h, new_w = target_h, min(math.ceil(width * scale_h), target_w)
    resized = image.resize((new_w, new_h))  # PIL's default filter (bicubic), as the original calls it
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def original_anyres_pixels(image, pinpoints, clip_processor, tile: int, shortest_edge: int) -> torch.Tensor:
    """``[1 + tiles, 3, tile, tile]``: base squash first, then row-major tiles of the padded canvas, each
    through the tower's CLIP processor (``clip_processor``: a transformers PIL image processor)."""
    canvas = original_resize_and_pad(image, original_best_resolution(image.size, pinpoints))
    tiles = [canvas.crop((left, top, left + tile, top + tile))
             for top in range(0, canvas.size[1], tile) for left in range(0, canvas.size[0], tile)]
    base = image.resize((shortest_edge, shortest_edge))
    return torch.stack([clip_processor(piece, return_tensors="pt")["pixel_values"][0] for piece in [base, *tiles]])


def original_unpad(tensor: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    width, height = image_size
    current_h, current_w = tensor.shape[1:]
    if width / height > current_w / current_h:
        new_h = int(height * (current_w / width))
        padding = (current_h - new_h) // 2
        return tensor[:, padding:current_h - padding, :]
    new_w = int(width * (current_h / height))
    padding = (current_w - new_w) // 2
    return tensor[:, :, padding:current_w - padding]


def original_pack(features: torch.Tensor, image_size: tuple[int, int], pinpoints, tile: int, side: int,
                  image_newline: torch.Tensor) -> torch.Tensor:
    """``[1 + tiles, side², H]`` -> ``[tokens, H]``: spatial_unpad packing of `llava_arch.py`."""
    base, tiles = features[0], features[1:]
    best_w, best_h = original_best_resolution(image_size, pinpoints)
    across, down = best_w // tile, best_h // tile
    grid = tiles.view(down, across, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
    grid = grid.flatten(1, 2).flatten(2, 3)
    grid = original_unpad(grid, image_size)
    grid = torch.cat((grid, image_newline[:, None, None].expand(*grid.shape[:-1], 1)), dim=-1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


class OriginalNextReference:
    """Original 1.6 inference of one checkpoint folder, loaded with transformers' CLIPVisionModel: the
    config's tower (from ``mm_vision_tower``) with the checkpoint's own (fine-tuned) tower weights,
    ``mm_projector`` (mlp2x_gelu) and ``image_newline``; one tower pass over all tiles."""

    def __init__(self, model_dir: Path, *, tower_weights_from_checkpoint: bool = True):
        from safetensors import safe_open
        from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

        model_dir = Path(model_dir)
        self.config = json.loads((model_dir / "config.json").read_text())
        tower_dir = Path(self.config["mm_vision_tower"])
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(index.values())):
            with safe_open(str(model_dir / shard), framework="pt") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
        if tower_weights_from_checkpoint:
            prefix = "model.vision_tower.vision_tower.vision_model."
            tower_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        else:
            with safe_open(str(tower_dir / "model.safetensors"), framework="pt") as f:
                tower_state = {k[len("vision_model."):]: f.get_tensor(k) for k in f.keys()}
        self.tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(str(tower_dir))).eval()
        self.tower.load_state_dict(tower_state, strict=True)
        hidden = self.config["hidden_size"]
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(self.config["mm_hidden_size"], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        self.projector.load_state_dict({k[len("model.mm_projector."):]: v for k, v in tensors.items()
                                        if k.startswith("model.mm_projector.")}, strict=True)
        self.image_newline = tensors["model.image_newline"]
        self.pinpoints = self.config["image_grid_pinpoints"]
        self.tile = self.tower.config.image_size
        self.side = self.tile // self.tower.config.patch_size
        self.select_layer = self.config["mm_vision_select_layer"]
        processor = json.loads((tower_dir / "preprocessor_config.json").read_text())
        self.shortest_edge = processor["size"]
        self.clip_processor = CLIPImageProcessorPil(
            size={"shortest_edge": processor["size"]},
            crop_size={"height": processor["crop_size"], "width": processor["crop_size"]},
            do_center_crop=True, resample=processor["resample"],
            image_mean=processor["image_mean"], image_std=processor["image_std"],
        )

    def pixels(self, image) -> torch.Tensor:
        return original_anyres_pixels(image, self.pinpoints, self.clip_processor, self.tile, self.shortest_edge)

    @torch.no_grad()
    def features(self, images) -> list[torch.Tensor]:
        """One ``[tokens, H]`` tensor per image; all tiles of all images go through the tower at once."""
        pixels = [self.pixels(image) for image in images]
        hidden = self.tower(torch.cat(pixels), output_hidden_states=True).hidden_states[self.select_layer][:, 1:]
        projected = self.projector(hidden).split([p.shape[0] for p in pixels])
        return [original_pack(f, image.size, self.pinpoints, self.tile, self.side, self.image_newline)
                for f, image in zip(projected, images)]
