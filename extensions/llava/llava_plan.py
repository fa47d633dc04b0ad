"""Image plans: how one checkpoint turns an image into pixels, packs its features and lays out its slot.

An :class:`ImagePlan` is built once per loaded checkpoint (``LlavaPipeline.load``, through its family's
``plan`` in ``llava_family``). It owns the three steps that must agree about one image:

=================  ===========================================================================================
``preprocess``     RGB PIL images -> one pixels tensor ``[tiles, 3, H, W]`` (float32, CPU) each
(the pipeline)     pixels -> vision tower -> projector -> ``[tiles, n, H_lm]`` (images of equal pixel shape
                   are batched together)
``pack``           ``[tiles, n, H_lm]`` -> the image's feature rows ``[N, H_lm]``
``layout``         image ``(width, height)`` -> :class:`llava_prompt.SlotLayout`, whose ``feature_rows`` is N;
                   from the size alone (webui's truncation counts prompts without decoding any image)
=================  ===========================================================================================

:class:`SquarePlan` is the LLaVA-1.5 plan (one fixed-size square tile per image); ``llava_next.AnyresPlan``
and ``llava_pixtral.PixtralPlan`` are the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

import llava_checkpoint
import llava_preprocess
from llava_checkpoint import IM_END_TEXT, IM_PATCH_TEXT, IM_START_TEXT, CheckpointError, LlavaSpec
from llava_prompt import SlotLayout, TokenRun

if TYPE_CHECKING:
    from llava_vision import TowerSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanContext:
    """What a family's plan may read when it is built: the parsed checkpoint, where the tower's config and
    preprocessing files live, and the loaded tower and projector (their sizes, devices and dtypes)."""

    spec: LlavaSpec
    source: "TowerSource"
    tower: torch.nn.Module
    projector: torch.nn.Module


class ImagePlan:
    """Base class; see the module docstring for the contract. Subclasses set ``fixed_pixels`` and
    implement the four methods below."""

    #: True when every image gives pixels of one shape: the tower may then be batched across images and
    #: replayed as a CUDA graph. Pixtral's variable image sizes set it False.
    fixed_pixels: bool = True
    #: True when ``layout`` does not depend on the image size (LLaVA-1.5: 576 for every image).
    fixed_tokens: bool = True

    def __init__(self, spec: LlavaSpec):
        self.spec = spec

    @classmethod
    def from_checkpoint(cls, context: PlanContext) -> "ImagePlan":
        """Build the plan of one loaded checkpoint (reads its preprocessing files, small tensors)."""
        raise NotImplementedError

    def preprocess(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """RGB PIL images -> one ``[tiles, 3, H, W]`` float32 CPU tensor each, bit-identical to the
        family's own processor (PIL backend)."""
        raise NotImplementedError

    def pack(self, projected: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``[tiles, n, H_lm]`` projector output of one image -> its ``[N, H_lm]`` feature rows, in the
        order they fill the slot's image positions."""
        raise NotImplementedError

    def layout(self, image_size: tuple[int, int]) -> SlotLayout:
        """The slot of an image of ``(width, height)``; ``layout(size).feature_rows`` equals the rows
        ``pack`` returns for that image."""
        raise NotImplementedError

    @property
    def nominal_size(self) -> tuple[int, int]:
        """``(width, height)`` assumed for an image whose size is unknown (webui's "Count tokens" path
        sees only its markers): the tower's input size."""
        raise NotImplementedError

    def describe(self) -> str:
        """Tokens per image, for the status line: "576 tokens per image"."""
        return f"{self.layout(self.nominal_size).positions} tokens per image"

    def image_slot(self, feature_rows: int) -> SlotLayout:
        """The LLaVA way of spelling ``feature_rows`` image positions in each checkpoint format:

        * llava-hf: the image token (``<image>``) x N
        * v0: ``<im_start>`` + ``<im_patch>`` x N + ``<im_end>`` (or the patches alone)
        * original v1: N positions that are not text at all (``tokenizer_image_token``'s -200 expanded);
          with ``mm_use_im_start_end`` framed by ``<im_start>`` / ``<im_end>`` text.
        """
        spec = self.spec
        if spec.format == "hf":
            return SlotLayout.image_tokens(spec.image_token_text, feature_rows)
        patch_text = IM_PATCH_TEXT if spec.format == "v0" else ""
        runs = (TokenRun(patch_text, feature_rows, image=True),)
        if spec.use_im_start_end:
            runs = (TokenRun(IM_START_TEXT, 1),) + runs + (TokenRun(IM_END_TEXT, 1),)
        return SlotLayout(runs)


class SquarePlan(ImagePlan):
    """LLaVA-1.5 and the llava-hf families built like it (VipLLaVA, llava-interleave): every image becomes
    one square tile of the tower's size (CLIP resize + center crop, or pad to square; SigLIP resize), and
    its ``(S / patch)²`` (+1 with CLS) features are its rows. A ``spatial_unpad`` original checkpoint
    without anyres appends ``image_newline`` as one more row."""

    def __init__(self, spec: LlavaSpec, preprocess_config: llava_preprocess.PreprocessConfig, tokens: int,
                 image_size: int, image_newline: torch.Tensor | None = None):
        super().__init__(spec)
        self.preprocess_config = preprocess_config
        self.image_newline = image_newline
        self.tokens = tokens + (1 if image_newline is not None else 0)
        self.image_size = image_size

    @classmethod
    def from_checkpoint(cls, context: PlanContext) -> "SquarePlan":
        spec, tower = context.spec, context.tower
        newline = read_image_newline(spec, context.projector) if "unpad" in spec.patch_merge_type else None
        return cls(spec, preprocess_config_for(spec, context.source, tower), tower.tokens_per_image,
                   tower.image_size, newline)

    def preprocess(self, images):
        pixels = llava_preprocess.preprocess_batch(list(images), self.preprocess_config)
        return list(pixels.split(1))

    def pack(self, projected, image_size):
        rows = projected.reshape(-1, projected.shape[-1])
        if self.image_newline is not None:  # a single-tile image under spatial_unpad ends with one newline row
            rows = torch.cat((rows, self.image_newline.to(rows)[None]), dim=0)
        return rows

    def layout(self, image_size):
        return self.image_slot(self.tokens)

    @property
    def nominal_size(self):
        return self.image_size, self.image_size


# ----------------------------------------------------------------------------------------------------------
# Reading what plans need from a checkpoint


def read_image_newline(spec: LlavaSpec, projector) -> torch.Tensor:
    """``image_newline`` ``[H_lm]`` of a spatial_unpad checkpoint, on the projector's device and dtype."""
    weights = llava_checkpoint.WeightFiles(spec.model_dir)
    for key in ("model.image_newline", "image_newline"):
        if key in weights:
            newline = weights.read([key])[key]
            break
    else:
        raise CheckpointError(f"{spec.model_dir} uses {spec.patch_merge_type} but stores no image_newline tensor")
    reference = next(projector.parameters())
    return newline.to(device=reference.device, dtype=reference.dtype)


def read_processor_settings(folder: Path) -> dict:
    """The image processor's settings: ``preprocessor_config.json``, or (transformers 5 saves) the
    ``image_processor`` entry of ``processor_config.json``; {} when neither exists."""
    path = Path(folder) / "preprocessor_config.json"
    settings = llava_checkpoint._read_json(path) if path.is_file() else {}
    if not settings and (Path(folder) / "processor_config.json").is_file():
        settings = llava_checkpoint._read_json(Path(folder) / "processor_config.json").get("image_processor") or {}
    return settings


def preprocess_config_for(spec: LlavaSpec, source, tower) -> llava_preprocess.PreprocessConfig:
    """Preprocessing of the checkpoint: its own ``preprocessor_config.json`` (llava-hf) or the tower's
    (original), padded to square when ``image_aspect_ratio`` is ``pad`` or the llava-hf processor pads."""
    folder = spec.model_dir if spec.format == "hf" else source.config_dir
    processor = read_processor_settings(folder)
    if spec.format == "hf":
        # LlavaImageProcessor's do_pad squares the image; LlavaNextImageProcessor's pads the tile count.
        pad = bool(processor.get("do_pad", False)) and processor.get("image_processor_type", "").startswith("LlavaImageProcessor")
        # llava-hf NeXT files carry `aspect_ratio_setting: "anyres"`; tiling follows the model config instead.
        processor = {k: v for k, v in processor.items() if k != "aspect_ratio_setting"}
        # SigLIP processors resize straight to size {height, width} and have no center crop at all; without
        # this, the CLIP defaults (crop to 224) would apply to a config that never mentions cropping.
        if processor.get("image_processor_type", "").startswith("Siglip"):
            processor.setdefault("do_center_crop", False)
    else:
        pad = spec.image_aspect_ratio == "pad"
    if not processor:
        logger.warning("No preprocessor_config.json in %s; using CLIP defaults at %d px", folder, tower.image_size)
        processor = {
            "size": {"shortest_edge": tower.image_size},
            "crop_size": {"height": tower.image_size, "width": tower.image_size},
            "image_mean": list(llava_checkpoint.OPENAI_CLIP_MEAN),
            "image_std": list(llava_checkpoint.OPENAI_CLIP_STD),
        }
    return llava_preprocess.PreprocessConfig.from_processor_dict(processor, pad_to_square=pad)
