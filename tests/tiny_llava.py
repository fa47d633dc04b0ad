"""Tiny seeded random LLaVA checkpoints written in every on-disk format the extension reads.

One in-memory `LlavaForConditionalGeneration` (a 2-layer Llama with hidden size 64 and a 3-layer CLIP
tower on 56 px images, 4x4 patches of 14 px) is written out as:

* ``clip/``: the CLIP vision tower that the original formats name in ``mm_vision_tower`` (transformers
  4.x ``CLIPVisionModel`` layout: ``vision_model.*`` keys, safetensors) plus a CLIP
  ``preprocessor_config.json`` in the old openai hub style (``size``/``crop_size`` as ints).
* ``clip_full/``: the same tower inside a whole ``CLIPModel`` dir (openai hub layout, random text half).
* ``v0/``: original LLaVA v0 (``model_type "llama"``, linear projector, ``<im_patch>``/``<im_start>``/
  ``<im_end>`` added tokens, one ``pytorch_model.bin``, no tower weights).
* ``v15/``: original LLaVA v1.5 (``model_type "llava"``, ``mlp2x_gelu``, ``image_aspect_ratio "pad"``,
  sharded ``pytorch_model-0000x-of-0000y.bin`` + index, frozen tower stored under
  ``model.vision_tower.vision_tower.vision_model.*`` as a 4.37 save after ``load_model()`` writes it).
* ``hf/``: llava-hf as converted under transformers 4.x (4.x key names, 4.x style ``config.json``, one
  ``model.safetensors``, ``<image>``/``<pad>`` added tokens, chat template, processor configs).
* ``hf5/``: the same model as transformers 5.6 ``save_pretrained`` writes a freshly built model (sharded
  safetensors with index; tower keys are ``vision_tower.*`` without ``vision_model.``) plus the files
  ``LlavaProcessor.save_pretrained`` writes.
* ``hf_linear/``: the llava-hf reference for v0: ``projector_hidden_act "linear"``, ``linear_1`` = the v0
  projector, ``linear_2`` = identity, the v0 tokenizer (llava-formats.md §5.1 last row, §5.2).

Key mapping between the formats follows llava-formats.md §2.3, §3.2 and §5.1. Everything is derived from
one seed, so the same seed always gives bit-identical files (up to the absolute `mm_vision_tower`
paths). This module is test support, not a test.
"""

from __future__ import annotations

import shutil
import sys
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# OpenAI CLIP normalisation constants (transformers `utils/constants.py`), as in every CLIP-L config.
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Requested size of the learned BPE part (incl. <unk>, <s>, </s> and the alphabet); the final vocab
# adds the 256 byte tokens and drops whitespace characters.
TOKENIZER_VOCAB_SIZE = 480
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
MODEL_MAX_LENGTH = 1024

TEXT_HIDDEN_SIZE = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE_SIZE = 128
MAX_POSITION_EMBEDDINGS = 1024
RMS_NORM_EPS = 1e-5

VISION_HIDDEN_SIZE = 32
VISION_INTERMEDIATE_SIZE = 64
VISION_LAYERS = 3
VISION_HEADS = 4
IMAGE_SIZE = 56
PATCH_SIZE = 14
PROJECTION_DIM = 32
VISION_FEATURE_LAYER = -2

# Weight scales chosen so that a 2-layer random model still decodes varied tokens and so that the
# image visibly moves the logits (the default 0.02 init gives near-uniform, image-blind logits).
WEIGHT_STD = 0.25
BIAS_STD = 0.1
NORM_WEIGHT_NOISE = 0.1

# llava-1.5-hf chat template behaviour (llava-formats.md §3.1): "ROLE: " prefix (none for system),
# "<image>\n" per image item first, then each text item + " ", assistant text inside {% generation %},
# generation prompt "ASSISTANT:". The string-content branch is an addition for convenience; for the
# list-of-items content the hub template accepts, the output is the same.
LLAVA_15_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' ' }}{% endif %}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ item['text'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ item['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyCheckpoints:
    """Paths and ids of one set of tiny checkpoints written by `write_tiny_checkpoints`."""

    root: Path
    clip: Path
    """CLIP vision tower dir named by ``mm_vision_tower`` in v0/v15 (safetensors + preprocessor config)."""
    clip_full: Path
    """The same tower inside a whole CLIPModel dir (plus a random tiny text tower), the layout of the
    openai CLIP hub repos; for loader tests (no checkpoint points at it)."""
    v0: Path
    v15: Path
    hf: Path
    hf5: Path
    hf_reference: Path
    """LlavaForConditionalGeneration reference for v15 and hf parity (the same dir as ``hf``)."""
    hf_linear_reference: Path
    """LlavaForConditionalGeneration reference for v0: identity ``linear_2``, linear activation."""
    seed: int
    base_vocab: int
    """V: the trained tokenizer's vocabulary, ids 0..V-1 (<unk>=0, <s>=1, </s>=2); v15's vocab_size."""
    image_token_id: int
    """V: ``<image>`` in hf/hf5 and ``<im_patch>`` in v0 (the image_token_index of both references)."""
    im_patch_id: int
    im_start_id: int
    """V+1: ``<im_start>`` in v0 (the same embedding row as ``<pad>`` in hf)."""
    im_end_id: int
    """V+2: ``<im_end>`` in v0."""
    hf_pad_id: int
    """V+1: ``<pad>`` in hf/hf5, ``pad_token_id`` of the llava-hf config."""
    unk_id: int
    bos_id: int
    eos_id: int
    v0_vocab: int
    """V+3: v0's vocab_size (embedding and lm_head rows)."""
    padded_vocab: int
    """V+3 rounded up to a multiple of 64: the llava-hf text vocab_size; rows >= V are random."""
    text_hidden_size: int
    vision_hidden_size: int
    image_size: int
    patch_size: int
    tokens_per_image: int
    """(image_size // patch_size) ** 2: image features per image (CLS dropped)."""
    vision_feature_layer: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def _training_corpus() -> list[str]:
    """A deterministic English-ish corpus with the words, roles, punctuation and digits of LLaVA prompts."""
    rng = random.Random(1234)
    subjects = [
        "the cat", "a dog", "the man", "a woman", "the child", "a bird", "the car", "a red bus",
        "the picture", "this image", "the photo", "a small boat", "the tree", "two people", "a horse",
    ]
    verbs = ["is sitting on", "is standing near", "looks at", "is next to", "holds", "is under",
             "is behind", "is in front of", "shows", "contains", "is playing with", "is eating"]
    objects = ["the table", "a chair", "the street", "a green field", "the window", "a blue sky",
               "the water", "a white wall", "the road", "some food", "a ball", "the door", "a book"]
    questions = [
        "What is this?", "What is in the image?", "Describe the picture.", "What color is the car?",
        "How many people are there?", "Where is the cat?", "Is there a dog in this photo?",
        "What is shown in this image?", "Can you describe this image in detail?", "Why is it here?",
    ]
    system_prompts = [
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions.",
        "A chat between a curious user and an artificial intelligence assistant.",
        "You are LLaVA, a large language and vision assistant.",
    ]
    common_words = (
        "hi hello yes no thank you please sure here there it he she they we I a an the of to in on at by "
        "for with from about over after before under between and or but so because if then when where why "
        "how who which what color red green blue yellow black white gray brown orange pink big small large "
        "tiny old new young happy sad bright dark left right top bottom middle center corner side front back "
        "person people man woman boy girl child dog cat bird horse cow sheep car truck bus train bike boat "
        "plane street road house building room kitchen table chair bed sofa window door wall floor sky cloud "
        "sun tree grass flower water river sea beach mountain snow food pizza cake apple banana sandwich cup "
        "plate bottle phone computer screen book sign text letter number one two three four five six seven "
        "eight nine ten see look show describe answer question detail picture photo image scene background "
        "foreground holding wearing standing sitting walking running playing eating riding looking smiling"
    ).split()
    lines = []
    for _ in range(300):
        length = rng.randint(4, 14)
        words = [rng.choice(common_words) for _ in range(length)]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ";", ":"]))
    for index in range(600):
        sentence = f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
        question = rng.choice(questions)
        number = rng.randint(0, 2024)
        style = index % 4
        if style == 0:
            lines.append(f"{rng.choice(system_prompts)} USER: <image>\n{question} ASSISTANT: {sentence}</s>")
        elif style == 1:
            lines.append(f"###Human: {question}\n<im_start><im_patch><im_end>###Assistant: {sentence}")
        elif style == 2:
            lines.append(f"[INST] <image>\n{question} [/INST] There are {number} of them; {sentence}")
        else:
            lines.append(f"Human: {question}\nAssistant: I see {number % 10} things, e.g. {sentence} (yes!)")
    # Every printable ASCII character once more, so the alphabet covers arbitrary English prompts.
    lines.append("".join(chr(code) for code in range(33, 127)))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 1000\n\n\t")
    return lines


def training_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """SentencePiece-like split used only while training: word starts ("▁"), single digits, whitespace
    characters and runs of punctuation are separate pieces, so no learned merge joins across them."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split(Regex(r"\d|\s|[^\w\s▁]+"), behavior="isolated"),
    ])


def train_tiny_tokenizer() -> Tokenizer:
    """Train a Llama-like BPE tokenizer and return it with its runtime pipeline.

    Layout as in Llama's vocabulary: <unk>/<s>/</s> = 0/1/2, the 256 byte-fallback tokens
    ``<0x00>``..``<0xFF>`` = 3..258 (so "\n" is ``<0x0A>`` = 13 and any character is encodable), then the
    learned pieces with a "▁" word prefix. The post-processor prepends <s>.

    The runtime pipeline is what transformers 5.6 ``LlamaTokenizer`` rebuilds from vocab and merges (no
    normalizer, ``Metaspace(prepend_scheme="first", split=False)``, byte fallback), so the raw
    ``tokenizers`` object and ``AutoTokenizer`` give the same ids. Training pre-splits more finely
    (`training_pre_tokenizer`); as no learned merge spans such a boundary, the unsplit runtime pipeline
    yields the same tokens (checked by a test).
    """
    trained = Tokenizer(models.BPE(unk_token=UNK))
    trained.pre_tokenizer = training_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS],
        show_progress=False,
        min_frequency=2,
    )
    trained.train_from_iterator(_training_corpus(), trainer=trainer)
    trained_model = json.loads(trained.to_str())["model"]
    # Whitespace other than "▁" is left to byte fallback, as SentencePiece Llama does for "\n".
    pieces = [
        piece for piece, _ in sorted(trained_model["vocab"].items(), key=lambda item: item[1])
        if piece not in (UNK, BOS, EOS) and not piece.isspace()
    ]
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    vocab = {piece: index for index, piece in enumerate([UNK, BOS, EOS, *byte_tokens, *pieces])}
    merges = [tuple(merge) for merge in trained_model["merges"]]
    if any(part.isspace() for merge in merges for part in merge):
        raise RuntimeError("a learned merge involves whitespace; the training split is wrong")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in (UNK, BOS, EOS)])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return tokenizer


def _write_tokenizer(
    directory: Path,
    base_tokenizer: Tokenizer,
    added_special_tokens: list[str],
    pad_token: str | None,
    extra_config: dict | None = None,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (transformers 4.x layout).

    ``added_special_tokens`` get ids V, V+1, ... in order (special, not normalized, as LLaVA adds them).
    """
    tokenizer = Tokenizer.from_str(base_tokenizer.to_str())
    base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    added = [AddedToken(token, special=True, normalized=False) for token in added_special_tokens]
    tokenizer.add_special_tokens(added)
    for offset, token in enumerate(added_special_tokens):
        if tokenizer.token_to_id(token) != base_vocab + offset:
            raise RuntimeError(f"added token {token} did not get id {base_vocab + offset}")
    tokenizer.save(str(directory / "tokenizer.json"))

    def token_entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder_entries = {str(index): token_entry(token) for index, token in
                       enumerate([UNK, BOS, EOS])}
    for offset, token in enumerate(added_special_tokens):
        decoder_entries[str(base_vocab + offset)] = token_entry(token)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder_entries,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }
    if extra_config:
        config.update(extra_config)
    write_json(directory / "tokenizer_config.json", config)
    special_map = {"bos_token": token_entry(BOS), "eos_token": token_entry(EOS), "unk_token": token_entry(UNK)}
    if pad_token is not None:
        special_map["pad_token"] = token_entry(pad_token)
    if added_special_tokens:
        special_map["additional_special_tokens"] = list(added_special_tokens)
        # transformers 4.x also wrote the added ids separately (llava-hf and LLaVA repos ship this file).
        write_json(directory / "added_tokens.json",
                    {token: base_vocab + offset for offset, token in enumerate(added_special_tokens)})
    write_json(directory / "special_tokens_map.json", special_map)


# ----------------------------------------------------------------------------------------------------
# Model


def padded_vocab_size(base_vocab: int) -> int:
    """V plus three added tokens, rounded up to a multiple of 64 (llava-hf's `pad_to_multiple_of=64`)."""
    return -(-(base_vocab + 3) // 64) * 64


def tiny_llava_config(base_vocab: int, projector_hidden_act: str = "gelu"):
    """The llava-hf `LlavaConfig` of the tiny model for a tokenizer of `base_vocab` ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text_config = LlamaConfig(
        hidden_size=TEXT_HIDDEN_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        intermediate_size=TEXT_INTERMEDIATE_SIZE,
        vocab_size=padded_vocab_size(base_vocab),
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=RMS_NORM_EPS,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=VISION_INTERMEDIATE_SIZE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=PROJECTION_DIM,
    )
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=base_vocab,
        pad_token_id=base_vocab + 1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act=projector_hidden_act,
        tie_word_embeddings=False,
    )


def build_tiny_llava(base_vocab: int, seed: int = 0):
    """Build the tiny `LlavaForConditionalGeneration` (float32, eval mode) with seeded, larger weights.

    Every parameter is redrawn from a private generator in `named_parameters` order, so the result
    depends only on `base_vocab` and `seed`, not on the global RNG. Norm weights are 1 + noise, biases
    small noise, everything else (embeddings including the padded rows, linears, convs, CLS and
    position embeddings) N(0, WEIGHT_STD²).
    """
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(tiny_llava_config(base_vocab)).to(torch.float32).eval()
    randomize_(model, seed)
    return model


def randomize_(model, seed: int) -> None:
    """Redraw every parameter, in ``named_parameters`` order, from a private generator seeded with
    ``seed``: norm weights 1 + noise, biases small noise, everything else N(0, WEIGHT_STD²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            module_name = name.rsplit(".", 2)[-2]
            if "norm" in module_name and name.endswith(".weight"):
                parameter.copy_(1.0 + NORM_WEIGHT_NOISE * noise)
            elif name.endswith(".bias"):
                parameter.copy_(BIAS_STD * noise)
            else:
                parameter.copy_(WEIGHT_STD * noise)


# In-memory (transformers 5.x) prefixes → transformers 4.x / llava-hf on-disk prefixes (§3.2).
_HF5_TO_HF4_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),  # LLaVA-NeXT only
)


def hf4_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under llava-hf 4.x names (`language_model.model.*`, `vision_tower.vision_model.*`)."""
    renamed = {}
    for name, tensor in model.state_dict().items():
        for memory_prefix, disk_prefix in _HF5_TO_HF4_PREFIXES:
            if name.startswith(memory_prefix):
                renamed[disk_prefix + name[len(memory_prefix):]] = tensor.detach().clone().contiguous()
                break
        else:
            raise KeyError(f"no llava-hf 4.x name for in-memory key {name}")
    return renamed


def vision_tower_state_dict(model) -> dict[str, torch.Tensor]:
    """CLIP tower weights under transformers 4.x `CLIPVisionModel` names (`vision_model.*`)."""
    prefix = "model.vision_tower."
    return {
        "vision_model." + name[len(prefix):]: tensor.detach().clone().contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(prefix)
    }


def original_language_state_dict(model, vocab_rows: int) -> dict[str, torch.Tensor]:
    """LLM weights under original LLaVA names; embedding and lm_head cut to the first `vocab_rows` rows."""
    state = model.state_dict()
    result = {}
    for name, tensor in state.items():
        if name.startswith("model.language_model."):
            result["model." + name[len("model.language_model."):]] = tensor
        elif name == "lm_head.weight":
            result["lm_head.weight"] = tensor
    result["model.embed_tokens.weight"] = result["model.embed_tokens.weight"][:vocab_rows]
    result["lm_head.weight"] = result["lm_head.weight"][:vocab_rows]
    return {name: tensor.detach().clone().contiguous() for name, tensor in result.items()}


# ----------------------------------------------------------------------------------------------------
# Writers


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def clip_image_processor_config(image_processor_type: str = "CLIPImageProcessor", processor_class: str | None = None,
                                **extra) -> dict:
    """llava-hf style image processor settings for the tiny image size (dict sizes), keys sorted;
    ``extra`` adds or overrides entries (e.g. LLaVA-NeXT's ``image_grid_pinpoints``)."""
    config = {
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_processor_type": image_processor_type,
        "image_std": OPENAI_CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": IMAGE_SIZE},
    }
    if processor_class is not None:
        config["processor_class"] = processor_class
    config.update(extra)
    return dict(sorted(config.items()))


def _vision_config_dict() -> dict:
    return {
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": VISION_HIDDEN_SIZE,
        "image_size": IMAGE_SIZE,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": VISION_INTERMEDIATE_SIZE,
        "layer_norm_eps": 1e-5,
        "model_type": "clip_vision_model",
        "num_attention_heads": VISION_HEADS,
        "num_channels": 3,
        "num_hidden_layers": VISION_LAYERS,
        "patch_size": PATCH_SIZE,
        "projection_dim": PROJECTION_DIM,
    }


def _write_clip(directory: Path, model) -> None:
    """CLIPVisionModel dir as transformers 4.x writes it, plus an openai-hub-style preprocessor config."""
    directory.mkdir(parents=True)
    config = {"architectures": ["CLIPVisionModel"], **_vision_config_dict(),
              "torch_dtype": "float32", "transformers_version": "4.37.2"}
    write_json(directory / "config.json", config)
    save_file(vision_tower_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    _write_clip_preprocessor_config(directory)


def _write_clip_preprocessor_config(directory: Path) -> None:
    # openai/clip-vit-large-patch14-336 still ships the pre-ImageProcessor format (int sizes).
    write_json(directory / "preprocessor_config.json", {
        "crop_size": IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "resample": 3,
        "size": IMAGE_SIZE,
    })


def _write_clip_full(directory: Path, model, seed: int) -> None:
    """A whole CLIPModel dir like openai/clip-vit-large-patch14-336 on the hub: `text_model.*` and
    `vision_model.*` weights; loading `CLIPVisionModel` from it must ignore the text half."""
    from transformers import CLIPConfig, CLIPModel

    directory.mkdir(parents=True)
    config = CLIPConfig(
        text_config={"hidden_size": VISION_HIDDEN_SIZE, "intermediate_size": VISION_INTERMEDIATE_SIZE,
                     "num_hidden_layers": 1, "num_attention_heads": VISION_HEADS, "vocab_size": 99,
                     "max_position_embeddings": 16, "projection_dim": PROJECTION_DIM},
        vision_config=_vision_config_dict(),
        projection_dim=PROJECTION_DIM,
    )
    clip = CLIPModel(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in clip.named_parameters():
            if not name.startswith("vision_model."):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    missing, unexpected = clip.load_state_dict(vision_tower_state_dict(model), strict=False)
    if unexpected or any(name.startswith("vision_model.") for name in missing):
        raise RuntimeError(f"tower weights do not fit CLIPModel: {unexpected=} {missing=}")
    config.save_pretrained(directory)
    weights = {name: tensor.detach().clone().contiguous() for name, tensor in clip.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _write_clip_preprocessor_config(directory)


def _original_llm_config(vocab_size: int) -> dict:
    """The flat Llama fields every original LLaVA config carries (§2.2)."""
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": TEXT_HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": TEXT_INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": TEXT_LAYERS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _write_v0(directory: Path, model, tokenizer: Tokenizer, clip_dir: Path, base_vocab: int) -> None:
    """Original v0: flat llama config, linear projector = HF linear_1, vocab V+3, no tower weights."""
    directory.mkdir(parents=True)
    config = {
        "_name_or_path": "tiny-llava-v0",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llama",
        **_original_llm_config(base_vocab + 3),
        "mm_hidden_size": VISION_HIDDEN_SIZE,
        "mm_use_im_start_end": True,
        "mm_vision_select_layer": VISION_FEATURE_LAYER,
        "mm_vision_tower": str(clip_dir.resolve()),
        "sep_image_conv_front": False,
        "transformers_version": "4.28.0.dev0",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    write_json(directory / "config.json", dict(sorted(config.items())))
    state = original_language_state_dict(model, base_vocab + 3)
    projector = model.model.multi_modal_projector.linear_1
    state["model.mm_projector.weight"] = projector.weight.detach().clone()
    state["model.mm_projector.bias"] = projector.bias.detach().clone()
    torch.save(state, directory / "pytorch_model.bin")
    _write_tokenizer(directory, tokenizer, ["<im_patch>", "<im_start>", "<im_end>"], pad_token=None)
    write_json(directory / "generation_config.json",
                {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})


def _write_v15(directory: Path, model, tokenizer: Tokenizer, clip_dir: Path, base_vocab: int) -> None:
    """Original v1.5: flat llava config, mlp2x_gelu projector, vocab V, tower stored, 2 .bin shards."""
    directory.mkdir(parents=True)
    config = {
        "_name_or_path": "tiny-llava-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **_original_llm_config(base_vocab),
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "max_length": MAX_POSITION_EMBEDDINGS,
        "mm_hidden_size": VISION_HIDDEN_SIZE,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": VISION_FEATURE_LAYER,
        "mm_vision_tower": str(clip_dir.resolve()),
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_mm_proj": True,
    }
    write_json(directory / "config.json", dict(sorted(config.items())))
    language = original_language_state_dict(model, base_vocab)
    projector = model.model.multi_modal_projector
    rest = {
        "model.mm_projector.0.weight": projector.linear_1.weight,
        "model.mm_projector.0.bias": projector.linear_1.bias,
        "model.mm_projector.2.weight": projector.linear_2.weight,
        "model.mm_projector.2.bias": projector.linear_2.bias,
    }
    rest = {name: tensor.detach().clone() for name, tensor in rest.items()}
    for name, tensor in vision_tower_state_dict(model).items():
        rest["model.vision_tower.vision_tower." + name] = tensor
    # Shard 1: embeddings and decoder layer 0; shard 2: the rest of the LLM, projector and tower.
    first = {name: tensor for name, tensor in language.items()
             if name == "model.embed_tokens.weight" or name.startswith("model.layers.0.")}
    second = {name: tensor for name, tensor in language.items() if name not in first}
    second.update(rest)
    shard_names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    weight_map = {}
    total_size = 0
    for shard_name, shard in zip(shard_names, (first, second)):
        torch.save(shard, directory / shard_name)
        for name, tensor in shard.items():
            weight_map[name] = shard_name
            total_size += tensor.numel() * tensor.element_size()
    write_json(directory / "pytorch_model.bin.index.json",
                {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
    _write_tokenizer(directory, tokenizer, [], pad_token=UNK)
    write_json(directory / "generation_config.json",
                {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                 "max_length": MAX_POSITION_EMBEDDINGS})


def _hf4_config_dict(base_vocab: int, projector_hidden_act: str) -> dict:
    """A llava-hf `config.json` in the shape transformers 4.x conversion wrote (§3.1)."""
    padded = padded_vocab_size(base_vocab)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2,
        "image_token_index": base_vocab,
        "model_type": "llava",
        "pad_token_id": base_vocab + 1,
        "projector_hidden_act": projector_hidden_act,
        "text_config": {
            "_name_or_path": "tiny-vicuna",
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": TEXT_INTERMEDIATE_SIZE,
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "model_type": "llama",
            "num_attention_heads": TEXT_HEADS,
            "num_hidden_layers": TEXT_LAYERS,
            "num_key_value_heads": TEXT_KV_HEADS,
            "pad_token_id": 0,
            "rms_norm_eps": RMS_NORM_EPS,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "vocab_size": padded,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0.dev0",
        "vision_config": _vision_config_dict(),
        "vision_feature_layer": VISION_FEATURE_LAYER,
        "vision_feature_select_strategy": "default",
        "vocab_size": padded,
    }


def _write_hf(directory: Path, model, tokenizer: Tokenizer, base_vocab: int) -> None:
    """llava-hf as converted under transformers 4.x: one model.safetensors with 4.x key names."""
    directory.mkdir(parents=True)
    write_json(directory / "config.json", _hf4_config_dict(base_vocab, "gelu"))
    save_file(hf4_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_json(directory / "generation_config.json",
                {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                 "pad_token_id": base_vocab + 1, "transformers_version": "4.36.0.dev0"})
    _write_tokenizer(directory, tokenizer, ["<image>", "<pad>"], pad_token="<pad>",
                     extra_config={"processor_class": "LlavaProcessor"})
    write_json(directory / "chat_template.json", {"chat_template": LLAVA_15_HF_CHAT_TEMPLATE})
    write_json(directory / "processor_config.json", {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": PATCH_SIZE,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    })
    write_json(directory / "preprocessor_config.json", clip_image_processor_config(processor_class="LlavaProcessor"))


def _write_hf5(directory: Path, model, hf_dir: Path) -> None:
    """What transformers 5.6 `save_pretrained` writes for the fresh model and for its processor."""
    from transformers import CLIPImageProcessor, LlavaProcessor, AutoTokenizer

    # ~600 KB of weights in several shards, so the index file is exercised.
    model.save_pretrained(directory, max_shard_size="200KB", safe_serialization=True)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(hf_dir),
        tokenizer=AutoTokenizer.from_pretrained(hf_dir),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_15_HF_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)


def _write_hf_linear(directory: Path, model, tokenizer: Tokenizer, base_vocab: int) -> None:
    """llava-hf reference for v0: linear activation, linear_1 = v0 projector, linear_2 = identity."""
    directory.mkdir(parents=True)
    write_json(directory / "config.json", _hf4_config_dict(base_vocab, "linear"))
    weights = hf4_state_dict(model)
    weights["multi_modal_projector.linear_2.weight"] = torch.eye(TEXT_HIDDEN_SIZE)
    weights["multi_modal_projector.linear_2.bias"] = torch.zeros(TEXT_HIDDEN_SIZE)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    # The v0 tokenizer: `<im_patch>` = V is this config's image_token_index (§5.2).
    _write_tokenizer(directory, tokenizer, ["<im_patch>", "<im_start>", "<im_end>"], pad_token=None)
    write_json(directory / "preprocessor_config.json", clip_image_processor_config())


def write_tiny_checkpoints(root: Path, seed: int = 0) -> TinyCheckpoints:
    """Write the tiny model in every format under `root` (created; must not already hold them)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer()
    base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    for token, expected_id in ((UNK, 0), (BOS, 1), (EOS, 2)):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"trained tokenizer put {token} at {tokenizer.token_to_id(token)}")
    model = build_tiny_llava(base_vocab, seed)

    paths = {name: root / name for name in ("clip", "clip_full", "v0", "v15", "hf", "hf5", "hf_linear")}
    _write_clip(paths["clip"], model)
    _write_clip_full(paths["clip_full"], model, seed)
    _write_v0(paths["v0"], model, tokenizer, paths["clip"], base_vocab)
    _write_v15(paths["v15"], model, tokenizer, paths["clip"], base_vocab)
    _write_hf(paths["hf"], model, tokenizer, base_vocab)
    _write_hf5(paths["hf5"], model, paths["hf"])
    _write_hf_linear(paths["hf_linear"], model, tokenizer, base_vocab)

    return TinyCheckpoints(
        root=root,
        clip=paths["clip"],
        clip_full=paths["clip_full"],
        v0=paths["v0"],
        v15=paths["v15"],
        hf=paths["hf"],
        hf5=paths["hf5"],
        hf_reference=paths["hf"],
        hf_linear_reference=paths["hf_linear"],
        seed=seed,
        base_vocab=base_vocab,
        image_token_id=base_vocab,
        im_patch_id=base_vocab,
        im_start_id=base_vocab + 1,
        im_end_id=base_vocab + 2,
        hf_pad_id=base_vocab + 1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        v0_vocab=base_vocab + 3,
        padded_vocab=padded_vocab_size(base_vocab),
        text_hidden_size=TEXT_HIDDEN_SIZE,
        vision_hidden_size=VISION_HIDDEN_SIZE,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        tokens_per_image=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=VISION_FEATURE_LAYER,
        image_mean=tuple(OPENAI_CLIP_MEAN),
        image_std=tuple(OPENAI_CLIP_STD),
    )


def make_test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture: smooth gradients plus seeded blocks, so crops and pads differ."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    phase = torch.rand(3, generator=generator) * 6.28
    channels = [0.5 + 0.5 * torch.sin(6.0 * xs + 4.0 * ys * (index + 1) + phase[index]) for index in range(3)]
    pixels = torch.stack(channels, dim=-1)
    blocks = torch.rand(4, 4, 3, generator=generator)
    block_rows = (torch.arange(height) * 4 // max(height, 1)).clamp(max=3)
    block_cols = (torch.arange(width) * 4 // max(width, 1)).clamp(max=3)
    pixels = 0.6 * pixels + 0.4 * blocks[block_rows][:, block_cols]
    array = (pixels * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


def main(argv: list[str] | None = None) -> int:
    """`python tests/tiny_llava.py DIR`: write the tiny checkpoints and a demo image `DIR/demo.png`, for
    trying the CLI or webui offline. Logs the folders written (stderr)."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.root.exists() and any(args.root.iterdir()):
        shutil.rmtree(args.root)
    checkpoints = write_tiny_checkpoints(args.root, seed=args.seed)
    make_test_image(96, 64, seed=args.seed).save(args.root / "demo.png")
    for name in ("v0", "v15", "hf", "hf5"):
        logging.getLogger("tiny_llava").info("%s checkpoint: %s", name, getattr(checkpoints, name))
    logging.getLogger("tiny_llava").info("demo image: %s", args.root / "demo.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
