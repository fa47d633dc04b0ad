"""Tiny seeded random checkpoints of the VipLLaVA, Pixtral (llava-hf form) and Mistral 3 families.

Each is written the way a hub repository of that family is laid out, with transformers' own
``save_pretrained`` for the model (config.json, safetensors with the names transformers writes) and, where
transformers can build it here, for the processor (tokenizer files, processor settings, chat template):

* ``vipllava/``: ``VipLlavaForConditionalGeneration`` (llava-hf/vip-llava-7b-hf style): a 6-layer CLIP tower,
  ``vision_feature_layers [-2, -5, 1, 4]`` (CLS cut, four layers concatenated, the last tower layer never
  needed), projector layernorm + MLP, Llama text model; ``LlavaProcessor`` files; the model card's
  ``###Human: <image>\\n...###Assistant:`` prompt as chat template.
* ``pixtral/``: ``LlavaForConditionalGeneration`` with a Pixtral vision config (mistral-community/pixtral-12b
  style): 2-D RoPE tower (3 layers, 8 px patches, images up to 64 px), ``vision_feature_layer -2``,
  ``"full"``, Mistral text model, a Tekken-like byte-level tokenizer whose first ids are Mistral's control
  tokens (``[IMG]`` = 10, ``[IMG_BREAK]`` = 12, ``[IMG_END]`` = 13), Pixtral image-processor settings and a
  ``processor_config.json`` as the hub repository ships them (``PixtralProcessor`` needs torchvision to be
  built, so those two files are written directly), a chat template in the style of the hub's.
* ``mistral3/``: ``Mistral3ForConditionalGeneration`` (mistralai/Mistral-Small-3.1-24B-Instruct-2503 style):
  the same kind of tower, ``spatial_merge_size 2`` (one token per 16 px), RMS norm + patch merger + MLP
  without biases, tied embeddings (Mistral3Config's default), a v7-style chat template with
  ``[SYSTEM_PROMPT]``.

Test support, not a test. Everything derives from one seed per kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
    VISION_HEADS,
    VISION_HIDDEN_SIZE,
    VISION_INTERMEDIATE_SIZE,
    padded_vocab_size,
)

VIPLLAVA_LAYERS = [-2, -5, 1, 4]
VIPLLAVA_TOWER_LAYERS = 6

PIXTRAL_PATCH = 8
PIXTRAL_MAX_EDGE = 64  # vision_config.image_size and the processor's longest_edge, as 1024 / 1024 in pixtral-12b
PIXTRAL_LAYERS = 3
MISTRAL3_MERGE = 2

# Mistral's control tokens in their Tekken ids (the first ids of the pixtral-12b / Mistral 3.1 vocabularies).
MISTRAL_CONTROL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]
IMG_ID, IMG_BREAK_ID, IMG_END_ID = 10, 12, 13
MISTRAL_VOCAB_SIZE = 420

# VipLLaVA's model card prompt ("...questions.###Human: <image>\n<prompt>###Assistant:") as a chat template
# (hub file unseen); list-of-parts contents with {% generation %}, as llava-hf templates are written.
VIPLLAVA_CHAT_TEMPLATE = (
    "{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human\\'s questions.' }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '###Human: ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% elif message['role'] == 'assistant' %}{{ '###Assistant: ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"
)

# In the style of mistral-community/pixtral-12b's template: string or list contents, a text part's text
# under "content" or "text", [IMG] for an image part, the optional system message in the last [INST].
PIXTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST]' + system_message + '\\n\\n' }}"
    "{%- else %}{{- '[INST]' }}{%- endif %}"
    "{%- endif %}"
    "{%- if message['content'] is not string %}"
    "{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'text' %}{%- if 'content' in chunk %}{{- chunk['content'] }}"
    "{%- elif 'text' in chunk %}{{- chunk['text'] }}{%- endif %}"
    "{%- elif chunk['type'] == 'image' %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Unrecognized content type!') }}{%- endif %}"
    "{%- endfor %}"
    "{%- else %}{{- message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Mistral v7 (Mistral-Small-3.1 style, without the dated default system prompt): [SYSTEM_PROMPT] blocks,
# [INST] ... [/INST] user turns whose parts are text ("text") or [IMG], assistant text + </s>.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for block in message['content'] %}{{- block['text'] }}{%- endfor %}{%- endif %}"
    "{{- eos_token }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class TinyFamilies:
    """Paths and facts of the checkpoints written by :func:`write_tiny_family_checkpoints`."""

    root: Path
    vipllava: Path
    pixtral: Path
    mistral3: Path
    llama_vocab: int  # V of the Llama-style tokenizer (VipLLaVA's <image> = V, <pad> = V + 1)
    mistral_vocab: int  # size of the Tekken-like tokenizer (= the Mistral text models' vocab)


# ----------------------------------------------------------------------------------------------------
# Tokenizers


def _mistral_corpus() -> list[str]:
    lines = tiny_llava._training_corpus()
    questions = ["What is in the image?", "Describe the picture.", "What color is the car?", "Where is the cat?"]
    for index in range(200):
        lines.append(f"[INST]{questions[index % 4]}[/INST]I see {index % 37} things in it.")
    return lines


def train_tiny_tekken_tokenizer() -> Tokenizer:
    """A byte-level BPE whose first ids are Mistral's control tokens (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``[INST]`` 3, ..., ``[IMG]`` 10, ``<pad>`` 11, ``[IMG_BREAK]`` 12, ``[IMG_END]`` 13), then bytes and merges;
    the post-processor prepends ``<s>``, as the pixtral-12b and Mistral 3.1 tokenizer.json files do."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                                   r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                                   r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                               behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MISTRAL_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=MISTRAL_CONTROL_TOKENS)
    tokenizer.train_from_iterator(_mistral_corpus(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in MISTRAL_CONTROL_TOKENS])
    for index, token in enumerate(MISTRAL_CONTROL_TOKENS):
        if tokenizer.token_to_id(token) != index:
            raise RuntimeError(f"control token {token} did not get id {index}")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 $B:1",
                                                             special_tokens=[("<s>", 1)])
    return tokenizer


def _mistral_tokenizer(tokenizer: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False)


def _llama_tokenizer(directory: Path, tokenizer: Tokenizer):
    """The tiny Llama tokenizer with ``<image>`` = V and ``<pad>`` = V + 1 (llava-hf's additions)."""
    from transformers import AutoTokenizer

    staging = directory.parent / f".{directory.name}-tokenizer"
    staging.mkdir(parents=True)
    tiny_llava._write_tokenizer(staging, tokenizer, ["<image>", "<pad>"], pad_token="<pad>")
    return AutoTokenizer.from_pretrained(str(staging))


# ----------------------------------------------------------------------------------------------------
# Configs and models


def _text_config(model_type: str, vocab: int, **extra):
    from transformers import AutoConfig

    fields = dict(
        hidden_size=TEXT_HIDDEN_SIZE, num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS, intermediate_size=TEXT_INTERMEDIATE_SIZE, vocab_size=vocab,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS, rms_norm_eps=RMS_NORM_EPS, rope_theta=10000.0,
    )
    fields.update(extra)
    return AutoConfig.for_model(model_type, **fields)


def _pixtral_vision_config():
    from transformers import PixtralVisionConfig

    return PixtralVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE, intermediate_size=VISION_INTERMEDIATE_SIZE, num_hidden_layers=PIXTRAL_LAYERS,
        num_attention_heads=VISION_HEADS, head_dim=VISION_HIDDEN_SIZE // VISION_HEADS, image_size=PIXTRAL_MAX_EDGE,
        patch_size=PIXTRAL_PATCH, hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def build_tiny_vipllava(llama_vocab: int, seed: int):
    from transformers import CLIPVisionConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    vision = CLIPVisionConfig(**{**{k: v for k, v in tiny_llava._vision_config_dict().items() if k != "model_type"},
                                 "num_hidden_layers": VIPLLAVA_TOWER_LAYERS})
    config = VipLlavaConfig(
        vision_config=vision,
        text_config=_text_config("llama", padded_vocab_size(llama_vocab), bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=llama_vocab, vision_feature_layers=VIPLLAVA_LAYERS, projector_layernorm_eps=1e-5,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, pad_token_id=llama_vocab + 1,
    )
    model = VipLlavaForConditionalGeneration(config).to(torch.float32).eval()
    tiny_llava.randomize_(model, seed)
    return model


def build_tiny_pixtral(mistral_vocab: int, seed: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=_pixtral_vision_config(),
        text_config=_text_config("mistral", mistral_vocab, head_dim=TEXT_HIDDEN_SIZE // TEXT_HEADS, sliding_window=None,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=11),
        image_token_index=IMG_ID, vision_feature_layer=-2, vision_feature_select_strategy="full",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    tiny_llava.randomize_(model, seed)
    return model


def build_tiny_mistral3(mistral_vocab: int, seed: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        vision_config=_pixtral_vision_config(),
        text_config=_text_config("mistral", mistral_vocab, head_dim=TEXT_HIDDEN_SIZE // TEXT_HEADS, sliding_window=None,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=11),
        image_token_index=IMG_ID, vision_feature_layer=-1, spatial_merge_size=MISTRAL3_MERGE,
        projector_hidden_act="gelu", multimodal_projector_bias=False,
    )
    model = Mistral3ForConditionalGeneration(config).to(torch.float32).eval()
    tiny_llava.randomize_(model, seed)
    if not model.config.tie_word_embeddings or model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("the tiny Mistral 3 should tie lm_head to the embeddings, as Mistral3Config does by default")
    return model


# ----------------------------------------------------------------------------------------------------
# Writers


def _write_vipllava(directory: Path, model, tokenizer) -> None:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    model.save_pretrained(directory, max_shard_size="300KB")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, resample=3, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=VIPLLAVA_CHAT_TEMPLATE, image_token="<image>").save_pretrained(directory)


def _write_pixtral_kind(directory: Path, model, tokenizer, *, chat_template: str, merge: int | None) -> None:
    """Model and tokenizer by save_pretrained; the Pixtral processor files as the hub repositories ship them."""
    from transformers import PixtralImageProcessorPil

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    PixtralImageProcessorPil(size={"longest_edge": PIXTRAL_MAX_EDGE}, patch_size={"height": PIXTRAL_PATCH, "width": PIXTRAL_PATCH},
                             image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample=3).save_pretrained(directory)
    settings = json.loads((directory / "preprocessor_config.json").read_text())
    # The hub files name the processor classes of the time (the PIL class is transformers 5's name).
    settings.update(image_processor_type="PixtralImageProcessor", processor_class="PixtralProcessor")
    tiny_llava.write_json(directory / "preprocessor_config.json", dict(sorted(settings.items())))
    processor = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
                 "patch_size": PIXTRAL_PATCH, "processor_class": "PixtralProcessor"}
    if merge is not None:
        processor["spatial_merge_size"] = merge
    tiny_llava.write_json(directory / "processor_config.json", processor)
    tiny_llava.write_json(directory / "chat_template.json", {"chat_template": chat_template})


def write_tiny_family_checkpoints(root: Path, seed: int = 0) -> TinyFamilies:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    llama = tiny_llava.train_tiny_tokenizer()
    llama_vocab = llama.get_vocab_size(with_added_tokens=True)
    paths = {name: root / name for name in ("vipllava", "pixtral", "mistral3")}

    _write_vipllava(paths["vipllava"], build_tiny_vipllava(llama_vocab, seed + 50), _llama_tokenizer(paths["vipllava"], llama))

    tekken = train_tiny_tekken_tokenizer()
    mistral_vocab = tekken.get_vocab_size(with_added_tokens=True)
    mistral_tokenizer = _mistral_tokenizer(tekken)
    _write_pixtral_kind(paths["pixtral"], build_tiny_pixtral(mistral_vocab, seed + 60), mistral_tokenizer,
                        chat_template=PIXTRAL_CHAT_TEMPLATE, merge=None)
    _write_pixtral_kind(paths["mistral3"], build_tiny_mistral3(mistral_vocab, seed + 70), mistral_tokenizer,
                        chat_template=MISTRAL3_CHAT_TEMPLATE, merge=MISTRAL3_MERGE)
    return TinyFamilies(root=root, **paths, llama_vocab=llama_vocab, mistral_vocab=mistral_vocab)


def main(argv: list[str] | None = None) -> int:
    """``python tests/tiny_families.py DIR``: write the three checkpoints under DIR (for manual runs)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: tiny_families.py OUTPUT_DIR\n")
        return 2
    written = write_tiny_family_checkpoints(Path(args[0]))
    for name in ("vipllava", "pixtral", "mistral3"):
        sys.stdout.write(f"{name}: {getattr(written, name)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
