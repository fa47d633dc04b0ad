"""Reading LLaVA checkpoints: format detection, the parsed spec, weight files, text-only LM loading.

Three on-disk formats are supported (details: shared docs `llava-formats.md` §2-§3):

* ``v0``  original LLaVA v0: a LLaMA config (model_type ``llama``) plus ``mm_*`` fields; the image is
  spelled in the prompt as ``<im_start>`` + N x ``<im_patch>`` + ``<im_end>`` (added vocabulary tokens).
* ``v1``  original LLaVA 1.0 / 1.5 (liuhaotian): flat config, model_type ``llava`` / ``llava_llama`` /
  ``llava_mistral``; ``<image>`` in the prompt stands for N feature positions and is not a token.
* ``hf``  the transformers layout (llava-hf ``LlavaForConditionalGeneration`` and the other families of
  ``llava_family``): ``text_config`` / ``vision_config``; the image token (``<image>``, ``[IMG]``) is a
  vocabulary token (``image_token_index``) repeated N times.

Which family a checkpoint belongs to (its tower, projector, image plan) is decided by ``llava_family``.

Nothing here touches the GPU; tensors are read on the CPU, only the ones asked for.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Original LLaVA spells these literally in prompts (llava/constants.py).
IMAGE_TEXT = "<image>"
IM_PATCH_TEXT = "<im_patch>"
IM_START_TEXT = "<im_start>"
IM_END_TEXT = "<im_end>"

# Model types written by the original LLaVA code for its flat configs.
ORIGINAL_TEXT_MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
# transformers LlavaNextConfig default (read as (height, width) there).
DEFAULT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says what is wrong and what to do."""


@dataclass(frozen=True)
class LlavaSpec:
    """Everything the vision pipeline needs to know about one LLaVA checkpoint, read from its files.

    ``vision_feature_layers`` index CLIP ``hidden_states`` (0 = embeddings after ``pre_layrnorm``,
    k = output of encoder layer k-1, negative counts from the end as in the references).
    """

    model_dir: Path
    format: str  # "v0" | "v1" | "hf"
    family: str  # a key of llava_family.FAMILIES: "llava", "llava_next", ...
    text_model_type: str  # "llama", "mistral", ...
    vision_tower_name: str | None  # hub id or path the config names (original formats)
    vision_in_checkpoint: bool  # tower weights are read from the checkpoint itself
    vision_feature_layers: tuple[int, ...]
    keep_cls: bool  # "full" / "cls_patch" keep the CLS row, "default" / "patch" drop it
    projector_type: str  # "linear" | "mlp{N}x_gelu" | "identity" | "hf" (linear_1, act, linear_2)
    projector_act: str  # activation name for the hf projector
    projector_bias: bool
    image_aspect_ratio: str  # "pad" | "crop"
    image_token_text: str | None  # hf: the `<image>` token text; original: None
    image_token_id: int | None  # hf: image_token_index; v0: the <im_patch> id (filled from the tokenizer)
    use_im_start_end: bool
    default_placement: str  # "after" (v0) or "before" (v1+): where an unplaced image goes
    template: str | None  # conversation template name for original checkpoints
    anyres: bool = False  # LLaVA-NeXT tiling (llava_next.py)
    grid_pinpoints: tuple = ()
    patch_merge_type: str = "flat"  # original: flat | spatial | spatial_unpad; llava-hf NeXT: spatial_unpad
    vision_type: str | None = None  # the vision config's model_type (hf), None: from the tower's own config
    hf_config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    raw_config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def image_markers(self) -> tuple[str, ...]:
        """What marks an image in a prompt typed by a person: ``<image>`` for every family, and the
        checkpoint's own image token too where it differs (``[IMG]`` for Pixtral and Mistral 3)."""
        return tuple(dict.fromkeys((IMAGE_TEXT, self.image_token_text or IMAGE_TEXT)))

    @property
    def tokenization(self) -> str:
        """``chunks``: text around each image tokenized separately (original v1 `tokenizer_image_token`);
        ``inline``: the prompt is tokenized once with the image spelled as vocabulary tokens (v0, hf)."""
        return "chunks" if self.format == "v1" else "inline"


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def read_raw_config(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    return _read_json(path)


def detect_format(config: dict) -> str | None:
    """Return "v0", "v1", "hf" or None (not a LLaVA checkpoint) for a raw ``config.json`` dict."""
    import llava_family

    model_type = config.get("model_type")
    if "text_config" in config or "vision_config" in config:
        return "hf" if llava_family.family_for_config(config) is not None else None
    if "mm_vision_tower" not in config and "mm_hidden_size" not in config:
        return None
    if model_type in ORIGINAL_TEXT_MODEL_TYPES:
        return "v1"
    # v0 was saved by a LLaMA-based fork before `auto_upgrade` renamed the type (llava/model/utils.py).
    if model_type == "llama" and "mm_projector_type" not in config:
        return "v0"
    if model_type == "llama":
        return "v1"
    raise CheckpointError(
        f"config.json has LLaVA fields (mm_vision_tower) but model_type {model_type!r}, which this extension "
        f"does not know; supported: llama (v0), {', '.join(sorted(ORIGINAL_TEXT_MODEL_TYPES))} (original), "
        "llava with text_config (llava-hf)"
    )


def _as_layers(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise CheckpointError(f"vision feature layer must be an int or a list of ints, got {value!r}")


def read_llava_spec(model_dir: str | os.PathLike) -> LlavaSpec | None:
    """Parse ``model_dir/config.json``; None when the folder is not a LLaVA checkpoint."""
    model_dir = Path(model_dir)
    config = read_raw_config(model_dir)
    if config is None:
        return None
    fmt = detect_format(config)
    if fmt is None:
        return None
    if fmt == "hf":
        return _read_hf_spec(model_dir, config)
    return _read_original_spec(model_dir, config, fmt)


def _read_hf_spec(model_dir: Path, config: dict) -> LlavaSpec:
    """A transformers-layout config, read the way its family's config class reads it."""
    import llava_family

    family = llava_family.family_for_config(config)
    text_config = config.get("text_config") or {}
    if family.cls_rule == "strategy":
        # An omitted strategy takes the family config class's default ("default" for Llava, "full" for
        # LlavaOnevision and AyaVision), as the reference reads it.
        strategy = config.get("vision_feature_select_strategy") or _config_class_default(
            family.config_class, "vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise CheckpointError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        keep_cls = strategy == "full"
    else:  # "drop": the reference always cuts the CLS row; "none": the tower has none, nothing is cut
        keep_cls = family.cls_rule == "none"
    image_token_id = config.get("image_token_index", config.get("image_token_id"))
    if image_token_id is None:
        image_token_id = _config_class_default(family.config_class, "image_token_index", 32000)
    processor = _read_json(model_dir / "processor_config.json") if (model_dir / "processor_config.json").is_file() else {}
    fields = dict(
        model_dir=model_dir,
        format="hf",
        family=family.name,
        text_model_type=text_config.get("model_type", family.text_model_type),
        vision_tower_name=None,
        vision_in_checkpoint=True,
        vision_feature_layers=_as_layers(config.get(family.feature_layer_key, family.default_feature_layer)),
        keep_cls=keep_cls,
        projector_type=family.projector_kind,
        projector_act=config.get("projector_hidden_act", "gelu"),
        projector_bias=bool(config.get("multimodal_projector_bias", True)),
        # llava-hf 1.5 ships a plain CLIPImageProcessor (resize + center crop); a LlavaImageProcessor with
        # do_pad pads to square like the original (llava-formats.md §1.1, §3.1).
        image_aspect_ratio="crop",
        image_token_text=processor.get("image_token", family.image_token_text),
        image_token_id=int(image_token_id),
        use_im_start_end=False,
        default_placement="before",
        template=None,
        vision_type=(config.get("vision_config") or {}).get("model_type") or family.vision_types[0],
        hf_config=config,
        raw_config=config,
    )
    fields.update(family.config_fields(config))
    return LlavaSpec(**fields)


def _read_original_spec(model_dir: Path, config: dict, fmt: str) -> LlavaSpec:
    tower = config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower:
        raise CheckpointError(f"{model_dir}/config.json has no mm_vision_tower: cannot tell which CLIP tower to use")
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
    aspect = config.get("image_aspect_ratio", "square")
    merge_type = config.get("mm_patch_merge_type", "flat")
    if merge_type not in ("flat", "spatial", "spatial_unpad"):
        raise CheckpointError(f"mm_patch_merge_type must be flat, spatial or spatial_unpad; got {merge_type!r}")
    if fmt == "v0":
        # v0 code always used hidden_states[layer][:, 1:] and a single Linear (7ace501 llava.py:51,129-137).
        select_feature = "patch"
        projector_type = "linear"
        default_layer = -1
    else:
        projector_type = config.get("mm_projector_type", "linear")
        default_layer = -2
    text_model_type = ORIGINAL_TEXT_MODEL_TYPES.get(config.get("model_type"), config.get("model_type", "llama"))
    return LlavaSpec(
        model_dir=model_dir,
        format=fmt,
        family="llava_next" if aspect == "anyres" else "llava",
        text_model_type=text_model_type,
        vision_tower_name=str(tower),
        vision_in_checkpoint=bool(config.get("unfreeze_mm_vision_tower", False)),
        vision_feature_layers=_as_layers(config.get("mm_vision_select_layer", default_layer)),
        keep_cls=select_feature == "cls_patch",
        projector_type=projector_type,
        projector_act="gelu",
        projector_bias=True,
        image_aspect_ratio="pad" if aspect == "pad" else "crop",
        image_token_text=None,
        image_token_id=None,
        use_im_start_end=bool(config.get("mm_use_im_start_end", fmt == "v0")),
        default_placement="after" if fmt == "v0" else "before",
        template=default_template_name(model_dir.name, fmt, text_model_type),
        anyres=aspect == "anyres",
        grid_pinpoints=_pinpoints(config.get("image_grid_pinpoints", DEFAULT_GRID_PINPOINTS)) if aspect == "anyres" else (),
        patch_merge_type=merge_type,
        raw_config=config,
    )


def _pinpoints(value) -> tuple:
    """``image_grid_pinpoints`` as a tuple of pairs (original configs may store the list as a string)."""
    from llava_preprocess import parse_grid_pinpoints

    try:
        return parse_grid_pinpoints(value)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def default_template_name(dir_name: str, fmt: str, text_model_type: str) -> str:
    """Conversation template of an original checkpoint (`llava/eval/run_llava.py:72-83` picks it by name;
    we prefer the config's model type and fall back to the name only to tell v1 variants apart)."""
    if fmt == "v0":
        return "llava_v0"
    if "llama-2" in dir_name.lower() or "llama_2" in dir_name.lower():  # llava-llama-2-13b-chat-lightning-preview
        return "llava_llama_2"
    if text_model_type == "mistral" or "mistral" in dir_name.lower():
        return "mistral_instruct"
    if "34b" in dir_name.lower():
        return "chatml_direct"
    return "llava_v1"


# ----------------------------------------------------------------------------------------------------------
# Weight files


class WeightFiles:
    """The weight files of one folder, read lazily: only requested tensors are materialised.

    safetensors files are opened with partial reads; ``.bin`` shards are read with
    ``torch.load(weights_only=True, mmap=True)`` and only the shards holding a requested key are opened.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._key_to_file = self._index()

    def _index(self) -> dict[str, Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.folder / index_name
            if index_path.is_file():
                weight_map = _read_json(index_path).get("weight_map", {})
                return {key: self.folder / name for key, name in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = self.folder / single
            if path.is_file():
                return {key: path for key in self._keys_of(path)}
        raise CheckpointError(
            f"no weights found in {self.folder} (expected model.safetensors, pytorch_model.bin or a sharded index)"
        )

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    return list(f.keys())
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: name the damaged file
                raise _unreadable_weights_error(path, exc) from exc
        return list(_torch_load(path).keys())

    def keys(self) -> Iterable[str]:
        return self._key_to_file.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def read(self, keys: Iterable[str]) -> dict[str, "torch.Tensor"]:
        """Return ``{key: tensor}`` (CPU) for the given keys; a missing key raises CheckpointError."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self._key_to_file:
                raise CheckpointError(f"tensor {key!r} is missing from the weights in {self.folder}")
            by_file.setdefault(self._key_to_file[key], []).append(key)
        tensors = {}
        for path, file_keys in by_file.items():
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    with safe_open(str(path), framework="pt") as f:
                        for key in file_keys:
                            tensors[key] = f.get_tensor(key)
                except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: name the damaged file
                    raise _unreadable_weights_error(path, exc) from exc
            else:
                state = _torch_load(path)
                for key in file_keys:
                    tensors[key] = state[key]
        return tensors

    def read_prefix(self, prefix: str, *, strip: bool = True) -> dict[str, "torch.Tensor"]:
        keys = [k for k in self._key_to_file if k.startswith(prefix)]
        tensors = self.read(keys)
        return {k[len(prefix):] if strip else k: v for k, v in tensors.items()}

    def find_prefix(self, candidates: Iterable[str], probe: str) -> str | None:
        """The first candidate prefix for which ``prefix + probe`` is a stored key."""
        for prefix in candidates:
            if prefix + probe in self._key_to_file:
                return prefix
        return None


def _torch_load(path: Path) -> dict:
    import torch

    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files written with the legacy (non-zip) serialisation cannot be memory-mapped.
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused_pickle_error(path, exc) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # a truncated or corrupt zip/pickle
        raise _unreadable_weights_error(path, exc) from exc


def _unreadable_weights_error(path, exc: BaseException) -> CheckpointError:
    text = str(exc).strip()
    reason = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return CheckpointError(f"cannot read the weights file {path} ({reason}); it is damaged or incomplete, "
                           "download it again")


def _refused_pickle_error(path, exc: pickle.UnpicklingError) -> CheckpointError:
    """torch's own message suggests ``weights_only=False``, which would run the file's code: never do that."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    culprit = f" (it references {found.group(1)})" if found else ""
    return CheckpointError(
        f"{path} holds pickled objects other than tensors{culprit}; refusing to load it, since unpickling "
        "them could run arbitrary code. Use a safetensors copy of this checkpoint from a source you trust."
    )


# ----------------------------------------------------------------------------------------------------------
# Text-only language model


# Checkpoint key -> text-only model key, for llava-hf files in every layout transformers has written
# (4.x names, 5.x in-memory names); vision and projector keys match nothing and stay unloaded.
HF_TEXT_KEY_MAPPING = {
    r"^language_model\.model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^model\.language_model\.": "model.",
}


def text_config_for(model_dir: str | os.PathLike, raw_config: dict | None = None):
    """The transformers config of the language model alone, for any supported checkpoint.

    ``AutoConfig`` cannot be used: on an original v1.5 config it silently builds a default 7B
    ``LlavaConfig`` text config, and it refuses ``llava_llama`` / ``llava_mistral`` (llava-formats.md §4).
    """
    from transformers import AutoConfig

    raw = dict(raw_config if raw_config is not None else read_raw_config(model_dir) or {})
    fmt = detect_format(raw)
    if fmt == "hf":
        import llava_family

        family = llava_family.family_for_config(raw)
        text = dict(raw.get("text_config") or {})
        model_type = text.pop("model_type", family.text_model_type)
        # The reference ties lm_head to the embeddings when the *top-level* config says so (its
        # PreTrainedModel reads config.tie_word_embeddings of the composite model); a key the file omits
        # takes the family config class's default (Mistral3Config: True, LlavaConfig: False).
        if "tie_word_embeddings" in raw:
            text["tie_word_embeddings"] = raw["tie_word_embeddings"]
        elif "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = _config_class_default(family.config_class, "tie_word_embeddings", False)
        text.update(family.text_overrides)
        return AutoConfig.for_model(model_type, **text)
    if fmt in ("v0", "v1"):
        model_type = ORIGINAL_TEXT_MODEL_TYPES.get(raw.get("model_type"), raw.get("model_type", "llama"))
        fields = {k: v for k, v in raw.items() if not _is_multimodal_field(k)}
        fields.pop("model_type", None)
        fields.pop("architectures", None)
        return AutoConfig.for_model(model_type, **fields)
    raise CheckpointError(f"{model_dir} is not a LLaVA checkpoint")


def _config_class_default(class_name: str, key: str, fallback):
    """The default of ``key`` in a transformers config class (dataclass fields in transformers 5)."""
    import transformers

    config_class = getattr(transformers, class_name, None)
    fields = getattr(config_class, "__dataclass_fields__", {})
    if key in fields and not isinstance(fields[key].default, type(dataclasses.MISSING)):
        return fields[key].default
    return getattr(config_class, key, fallback) if config_class is not None else fallback


def _is_multimodal_field(key: str) -> bool:
    return key.startswith("mm_") or key in {
        "use_mm_proj", "image_aspect_ratio", "image_grid_pinpoints", "unfreeze_mm_vision_tower",
        "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "sep_image_conv_front", "vision_tower",
        "image_crop_resolution", "image_split_resolution", "tokenizer_model_max_length",
        "tokenizer_padding_side", "mm_projector_lr", "mm_vision_tower_lr",
    }


def load_language_model(model_dir: str | os.PathLike, **from_pretrained_kwargs):
    """Load only the language model of a LLaVA checkpoint as a ``*ForCausalLM``.

    Accepts every ``from_pretrained`` option (``dtype``, ``device_map``, ``quantization_config``, ...).
    Vision tower, projector and ``image_newline`` tensors are never read: they match no key of the
    text model. This is the one function webui's Transformers loader is routed to.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    raw = read_raw_config(model_dir)
    if raw is None:
        raise CheckpointError(f"{model_dir} has no config.json")
    fmt = detect_format(raw)
    kwargs = dict(from_pretrained_kwargs)
    kwargs.pop("config", None)  # a LlavaConfig from the caller describes the wrong model
    kwargs.pop("trust_remote_code", None)  # never: the text model is a stock transformers class
    config = text_config_for(model_dir, raw)
    if fmt == "hf":
        kwargs["key_mapping"] = {**HF_TEXT_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
    started = time.perf_counter()
    model = _from_pretrained_quietly(AutoModelForCausalLM, model_dir, config, kwargs)
    quantized = ", 4-bit" if getattr(model, "is_loaded_in_4bit", False) else (
        ", 8-bit" if getattr(model, "is_loaded_in_8bit", False) else "")
    logger.info(
        "Loaded the %s language model of %s (%s format%s) in %.2f s",
        type(model).__name__, model_dir.name, fmt, quantized, time.perf_counter() - started,
    )
    return model


def mask_ids_past_tokenizer(model, tokenizer_size: Callable[[], int | None]) -> None:
    """Give ids at or past ``tokenizer_size()`` a logit of -inf in every forward of ``model``.

    llava-hf pads the language model's vocabulary past its tokenizer (32064 rows for 32002 tokens) with
    rows that have no token. webui turns every id it meets into text (the reply, streaming, logprobs and
    top_logprobs, /v1/internal/logits) and fails on one without a token, so such ids must never win,
    nor be listed. Masking the model's output (``logits``: ``(batch, positions, rows)``) does it before
    any logits processor, sampler or webui's logprobs code sees the scores; the logits of real tokens
    are left exactly as they are. ``tokenizer_size`` is asked on every forward (None: mask nothing).
    Installing twice only replaces the source; the hook lives and dies with the model object.
    """
    if getattr(model, "_llava_tokenizer_size", None) is not None:
        model._llava_tokenizer_size = tokenizer_size
        return
    model._llava_tokenizer_size = tokenizer_size
    model.register_forward_hook(_mask_rows_past_tokenizer)


def _mask_rows_past_tokenizer(model, args, output):
    size = model._llava_tokenizer_size()
    logits = output.get("logits") if isinstance(output, dict) else None
    if size is None or logits is None or logits.shape[-1] <= size:
        return output
    if logits.requires_grad:
        # Training (webui's LoRA tab): an in-place write could clobber a tensor autograd saved.
        output["logits"] = logits.index_fill(-1, _range_from(size, logits), float("-inf"))
    else:
        logits[..., size:] = float("-inf")
    return output


def _range_from(start: int, logits):
    import torch

    return torch.arange(start, logits.shape[-1], device=logits.device)


def _from_pretrained_quietly(auto_class, model_dir: Path, config, kwargs: dict):
    """``from_pretrained`` without the "unexpected keys" report that the skipped vision tensors cause."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto_class.from_pretrained(str(model_dir), config=config, output_loading_info=True, **kwargs)
    except pickle.UnpicklingError as exc:  # transformers reads .bin files with weights_only=True as well
        raise _refused_pickle_error(model_dir, exc) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise CheckpointError(
            f"the language model in {model_dir} is missing {len(missing)} tensors (first: {sorted(missing)[:3]}); "
            "the checkpoint is incomplete or not a LLaVA checkpoint of a supported format"
        )
    return model


# ----------------------------------------------------------------------------------------------------------
# Making transformers' auto classes route LLaVA checkpoints to the text-only loader


def register_with_transformers(tokenizer_size: Callable[[], int | None] | None = None) -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(<LLaVA dir>)`` return the text-only language model.

    webui's Transformers loader uses ``AutoModelForCausalLM``, which refuses ``model_type: llava`` and
    whose ``AutoConfig`` refuses ``llava_llama`` / ``llava_mistral``. Registering is idempotent and cheap.

    ``tokenizer_size``: when given, every model loaded this way gets :func:`mask_ids_past_tokenizer` with
    it (webui passes the size of its loaded tokenizer). A later call with a source gives it to loaders
    registered earlier without one (the autoload hook registers before the extension is set up).
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import llava_family

    config_classes = list(dict.fromkeys(getattr(transformers, f.config_class) for f in llava_family.FAMILIES.values()))
    for model_type, base in (("llava_llama", LlamaConfig), ("llava_mistral", MistralConfig)):
        if model_type in CONFIG_MAPPING:
            config_classes.append(CONFIG_MAPPING[model_type])
            continue
        config_class = type(f"{base.__name__.replace('Config', '')}LlavaTextConfig", (base,), {"model_type": model_type})
        AutoConfig.register(model_type, config_class)
        config_classes.append(config_class)
    for config_class in config_classes:
        registered = AutoModelForCausalLM._model_mapping._extra_content.get(config_class)
        if registered is not None:
            if tokenizer_size is not None and issubclass(registered, _TextOnlyLoader):
                registered.tokenizer_size = staticmethod(tokenizer_size)
            continue
        loader = type(
            f"LlavaTextOnly{config_class.__name__.replace('Config', '')}",
            (_TextOnlyLoader,),
            {"config_class": config_class,
             "tokenizer_size": staticmethod(tokenizer_size) if tokenizer_size is not None else None},
        )
        AutoModelForCausalLM.register(config_class, loader, exist_ok=True)


class _TextOnlyLoader:
    """Stands in the auto mapping for the LLaVA config classes; builds nothing itself."""

    config_class = None
    tokenizer_size = None  # see register_with_transformers

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        local = Path(pretrained_model_name_or_path)
        if not local.is_dir():
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(str(pretrained_model_name_or_path)))
        model = load_language_model(local, **kwargs)
        if cls.tokenizer_size is not None:
            mask_ids_past_tokenizer(model, cls.tokenizer_size)
        return model

    @classmethod
    def _from_config(cls, config, **kwargs):
        """What ``AutoModelForCausalLM.from_config`` calls on the mapped class (transformers 5)."""
        return cls.from_config(config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build the empty text model (webui does this under ``init_empty_weights`` to plan 8-bit device
        maps). Only configs that carry the real text dimensions can be used: llava-hf ``text_config``,
        or the flat ``llava_llama`` / ``llava_mistral`` configs registered above."""
        from transformers import AutoConfig, AutoModelForCausalLM

        text_config = getattr(config, "text_config", None)
        if text_config is not None and not hasattr(config, "mm_vision_tower"):
            # As load_language_model: lm_head is tied when the composite config says so (Mistral3Config).
            text_config = copy.deepcopy(text_config)
            text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", text_config.tie_word_embeddings))
            return AutoModelForCausalLM.from_config(text_config, **kwargs)
        base_type = ORIGINAL_TEXT_MODEL_TYPES.get(getattr(config, "model_type", ""))
        if base_type and text_config is None:
            fields = {k: v for k, v in config.to_dict().items() if not _is_multimodal_field(k)}
            fields.pop("model_type", None)
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(base_type, **fields), **kwargs)
        raise CheckpointError(
            "this original LLaVA config (model_type 'llava') cannot be turned into a model without its folder; "
            "load it without a GPU split / CPU memory limit, or with 4-bit quantization"
        )
