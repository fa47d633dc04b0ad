"""Aya Vision (``AyaVisionForConditionalGeneration``): tiling, the token layout of one image, preprocessing
and the pixel-shuffle projector, following transformers 5.6 exactly.

An image is cut into the grid of up to ``max_patches`` tiles whose aspect ratio is closest to the image's
(GotOcr2 tiling), plus a thumbnail of the whole image when there is more than one tile. Every tile goes
through the SigLIP tower on its own; the projector folds each 2x2 block of features into one row
(pixel shuffle), then LayerNorm -> ``linear_1`` -> SwiGLU -> ``linear_2``. In the prompt one image becomes

    <|START_OF_IMG|> TILE_1 <|IMG_PATCH|>*k … TILE_{n-1} <|IMG_PATCH|>*k TILE_GLOBAL <|IMG_PATCH|>*k <|END_OF_IMG|>

(``k`` = tokens per tile; the tile labels are ordinary text), and the features of the tiles, thumbnail
last, fill the ``<|IMG_PATCH|>`` positions in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_checkpoint import CheckpointError, LlavaSpec, WeightFiles
from llava_plan import ImagePlan, PlanContext, read_processor_settings
from llava_prompt import SlotLayout, TokenRun


class AyaConfigError(CheckpointError):
    """An Aya Vision config this module cannot follow, with what was found."""


@dataclass(frozen=True)
class AyaLayout:
    """How one image is spelled in the prompt and how many tiles it takes; from ``processor_config.json``.

    ``tile``: ``img_size`` in pixels; ``tokens_per_tile``: ``(img_size // (patch_size * downsample_factor))²``
    as the processor computes it (169 for aya-vision-8b).
    """

    tile: int
    tokens_per_tile: int
    min_tiles: int
    max_tiles: int
    crop_to_patches: bool
    start_of_image: str = "<|START_OF_IMG|>"
    end_of_image: str = "<|END_OF_IMG|>"
    image_token: str = "<|IMG_PATCH|>"
    tile_token: str = "TILE"
    tile_global_token: str = "TILE_GLOBAL"

    @classmethod
    def from_processor_configs(cls, processor: dict, image_processor: dict) -> "AyaLayout":
        """From the processor settings (``processor_config.json``) and the image-processor settings
        (``preprocessor_config.json`` or the dict nested in ``processor_config.json``)."""
        img_size = int(processor.get("img_size", 364))
        patch = int(processor.get("patch_size", 28)) * int(processor.get("downsample_factor", 1))
        size = image_processor.get("size") or {"height": 384, "width": 384}
        height, width = (size["height"], size["width"]) if isinstance(size, dict) and "height" in size else (None, None)
        if height != width:
            raise AyaConfigError(f"Aya Vision tiles must be square, the image processor's size is {size!r}")
        if height != img_size:
            raise AyaConfigError(f"the processor's img_size {img_size} differs from the image processor's tile size {height}")
        return cls(
            tile=img_size,
            tokens_per_tile=(img_size // patch) ** 2,
            min_tiles=int(image_processor.get("min_patches", 1)),
            max_tiles=int(image_processor.get("max_patches", 12)),
            # AyaVisionProcessor passes its own default `crop_to_patches=True` with every call, which
            # outranks the image processor's setting: Aya images are always tiled.
            crop_to_patches=True,
            start_of_image=processor.get("start_of_img_token", cls.start_of_image),
            end_of_image=processor.get("end_of_img_token", cls.end_of_image),
            image_token=processor.get("img_patch_token", cls.image_token),
            tile_token=processor.get("tile_token", cls.tile_token),
            tile_global_token=processor.get("tile_global_token", cls.tile_global_token),
        )

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """Tower inputs for an image of ``(width, height)``: the grid, plus the thumbnail when the grid has
        more than one tile (``GotOcr2ImageProcessor.get_number_of_image_patches``)."""
        if not self.crop_to_patches or self.max_tiles <= 1:
            return 1
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        width, height = image_size
        columns, rows = get_optimal_tiled_canvas((height, width), (self.tile, self.tile), self.min_tiles, self.max_tiles)
        return 1 if columns * rows == 1 else columns * rows + 1

    def image_tokens(self, image_size: tuple[int, int]) -> int:
        """Feature rows (``<|IMG_PATCH|>`` positions) of one image."""
        return self.num_tiles(image_size) * self.tokens_per_tile

    def expansion(self, num_tiles: int) -> str:
        """The text one image becomes (``AyaVisionProcessor._prompt_split_image``)."""
        patches = self.image_token * self.tokens_per_tile
        labelled = "".join(f"{self.tile_token}_{index}{patches}" for index in range(1, num_tiles))
        return f"{self.start_of_image}{labelled}{self.tile_global_token}{patches}{self.end_of_image}"


class AyaPreprocessor:
    """Pixels of one image, bit-identical to transformers' ``GotOcr2ImageProcessorPil`` as
    ``AyaVisionProcessor`` runs it (which it runs; no torchvision needed): ``[num_tiles, 3, tile, tile]``
    float32, the tiles in raster order, then the thumbnail."""

    def __init__(self, folder: str | Path, layout: AyaLayout):
        from transformers import GotOcr2ImageProcessorPil

        self._processor = GotOcr2ImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        self.layout = layout

    def __call__(self, image: Any) -> torch.Tensor:
        import numpy as np

        output = self._processor([image], crop_to_patches=self.layout.crop_to_patches)
        return torch.from_numpy(np.stack(output["pixel_values"]))


class AyaProjector(nn.Module):
    """Tower features ``[B, S*S, C]`` (S = tile // patch, even) -> embeddings ``[B, (S/2)², H_lm]``.

    Pixel shuffle (each 2x2 block of features becomes one row of width 4C) -> LayerNorm -> ``linear_1``
    (to ``intermediate``) -> SwiGLU (``silu(gate) * x`` of its two halves) -> ``linear_2`` (``intermediate/2``
    -> H_lm). Parameter names are the checkpoint's (``layernorm``, ``linear_1``, ``linear_2``).
    """

    def __init__(self, in_features: int, downsample: int, intermediate: int, out_features: int, eps: float):
        super().__init__()
        if intermediate % 2:
            raise AyaConfigError(f"the SwiGLU projector needs an even intermediate width, got {intermediate}")
        self.downsample = downsample
        width = in_features * downsample ** 2
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.linear_1 = nn.Linear(width, intermediate, bias=True)
        self.linear_2 = nn.Linear(intermediate // 2, out_features, bias=True)

    @property
    def out_features(self) -> int:
        return self.linear_2.out_features

    @classmethod
    def load(cls, spec: LlavaSpec, weights: WeightFiles, *, tower: nn.Module, lm_hidden_size: int) -> "AyaProjector":
        """The checkpoint's ``multi_modal_projector`` on the CPU in float32, widths checked at load."""
        import llava_vision

        tensors = llava_vision.read_hf_projector_tensors(weights, probe="layernorm.weight")
        config = spec.raw_config
        return projector_from_tensors(tensors, tower_width=tower.feature_size,
                                      downsample=int(config.get("downsample_factor", 2)),
                                      eps=float(config.get("adapter_layer_norm_eps", 1e-6)), lm_hidden_size=lm_hidden_size)

    def pixel_shuffle(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, S*S, C]`` -> ``[B, S/d, S/d, C*d²]``, in transformers' order of reshapes and permutes (the
        grid is read column-major there; the layout of the rows follows from exactly these steps)."""
        batch, length, _ = features.shape
        side = int(length ** 0.5)
        if side * side != length or side % self.downsample:
            raise ValueError(f"pixel shuffle needs a square feature map whose side divides by {self.downsample}, "
                             f"got {length} rows")
        d = self.downsample
        features = features.reshape(batch, side, side, -1)
        channels = features.shape[-1]
        features = features.reshape(batch, side, side // d, channels * d)
        features = features.permute(0, 2, 1, 3)
        features = features.reshape(batch, side // d, side // d, -1)
        return features.permute(0, 2, 1, 3)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``[B, S*S, C]`` -> ``[B, (S/d)², H_lm]`` (``grid``, the patch rows and columns, is implied: the
        reference takes the square root of the row count)."""
        hidden = self.linear_1(self.layernorm(self.pixel_shuffle(features)))
        x, gate = hidden.chunk(2, dim=-1)
        hidden = self.linear_2(nn.functional.silu(gate) * x)
        return hidden.flatten(1, 2)  # [B, (S/d)², H]: rows in the order the reference scatters them


def projector_from_tensors(tensors: dict[str, torch.Tensor], *, tower_width: int, downsample: int, eps: float,
                           lm_hidden_size: int) -> AyaProjector:
    """Build an :class:`AyaProjector` from ``{layernorm.*, linear_1.*, linear_2.*}`` tensors, its widths read
    from their shapes and checked against the tower and the language model."""
    required = [f"{name}.{kind}" for name in ("layernorm", "linear_1", "linear_2") for kind in ("weight", "bias")]
    missing = [key for key in required if key not in tensors]
    if missing:
        raise AyaConfigError(f"the Aya projector tensors lack {missing}")
    width = tower_width * downsample ** 2
    intermediate, in_width = tensors["linear_1.weight"].shape
    if in_width != width or tensors["layernorm.weight"].shape[0] != width:
        raise AyaConfigError(
            f"the Aya projector expects {in_width}-wide input, but the tower gives {tower_width} x {downsample}² = "
            f"{width}; hint: downsample_factor or the vision config does not match this checkpoint")
    out_features, half = tensors["linear_2.weight"].shape
    if half * 2 != intermediate:
        raise AyaConfigError(f"linear_2 takes {half} inputs, SwiGLU gives {intermediate // 2}")
    if out_features != lm_hidden_size:
        raise AyaConfigError(f"projector output width {out_features} does not match the language model's "
                             f"embedding width {lm_hidden_size}; hint: the loaded language model is not this checkpoint's")
    with torch.device("meta"):
        projector = AyaProjector(tower_width, downsample, intermediate, out_features, eps)
    projector = projector.to_empty(device="cpu")
    projector.load_state_dict({key: tensors[key] for key in required}, strict=True)
    return projector


class AyaPlan(ImagePlan):
    """The image plan of an Aya Vision checkpoint: GotOcr2 tiles plus thumbnail, each tile's
    ``tokens_per_tile`` rows in order, the slot spelled as :meth:`AyaLayout.expansion`."""

    fixed_tokens = False

    def __init__(self, spec: LlavaSpec, layout: AyaLayout, preprocessor: AyaPreprocessor,
                 label_ids: dict[str, tuple[int, ...]]):
        super().__init__(spec)
        self.aya_layout = layout
        self.preprocessor = preprocessor
        self.label_ids = label_ids

    @classmethod
    def from_checkpoint(cls, context: PlanContext) -> "AyaPlan":
        spec, tower = context.spec, context.tower
        folder = Path(spec.model_dir)
        processor_file = folder / "processor_config.json"
        processor = json.loads(processor_file.read_text(encoding="utf-8")) if processor_file.is_file() else {}
        layout = AyaLayout.from_processor_configs(processor, read_processor_settings(folder))
        downsample = int(spec.raw_config.get("downsample_factor", 2))
        side = tower.image_size // tower.patch_size
        if layout.tile != tower.image_size or (side // downsample) ** 2 != layout.tokens_per_tile:
            raise AyaConfigError(
                f"{folder}: the processor lays out {layout.tokens_per_tile} tokens per {layout.tile} px tile, the "
                f"vision tower and projector give ({side} // {downsample})² per {tower.image_size} px tile")
        return cls(spec, layout, AyaPreprocessor(folder, layout), _label_ids(folder, layout))

    def preprocess(self, images):
        return [self.preprocessor(image) for image in images]

    def pack(self, projected, image_size):
        expected = self.aya_layout.num_tiles(image_size)
        if projected.shape[0] != expected:
            raise ValueError(f"expected {expected} tiles for a {image_size[0]}x{image_size[1]} image, "
                             f"got {projected.shape[0]}")
        return projected.reshape(-1, projected.shape[-1])  # tiles in order, the thumbnail last

    def layout(self, image_size):
        layout, per_tile = self.aya_layout, self.aya_layout.tokens_per_tile
        tiles = layout.num_tiles(image_size)
        runs = [TokenRun(layout.start_of_image, 1)]
        for label in [f"{layout.tile_token}_{index}" for index in range(1, tiles)] + [layout.tile_global_token]:
            runs += [TokenRun(label, 1, ids=self.label_ids[label]), TokenRun(layout.image_token, per_tile, image=True)]
        runs.append(TokenRun(layout.end_of_image, 1))
        return SlotLayout(tuple(runs))

    @property
    def nominal_size(self):
        return self.aya_layout.tile, self.aya_layout.tile

    def describe(self) -> str:
        per_tile = self.aya_layout.tokens_per_tile
        return (f"{per_tile} tokens per tile, 1 to {self.aya_layout.max_tiles} tiles (+ thumbnail) per image: "
                f"{per_tile}-{per_tile * (self.aya_layout.max_tiles + 1)} tokens")


def _label_ids(folder: Path, layout: AyaLayout) -> dict[str, tuple[int, ...]]:
    """Ids of every tile label (``TILE_1`` .. ``TILE_{max}``, ``TILE_GLOBAL``) under the checkpoint's own
    tokenizer. The labels are ordinary text that the processor writes between added tokens, so each is
    tokenized on its own; the prompt tokenization checks they come out the same in place."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the plan cannot spell its images
        raise AyaConfigError(f"cannot load the tokenizer of {folder} to spell Aya Vision's tile labels: {exc}") from exc
    labels = [f"{layout.tile_token}_{index}" for index in range(1, layout.max_tiles + 1)] + [layout.tile_global_token]
    ids = {label: tuple(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels}
    empty = [label for label, label_ids in ids.items() if not label_ids]
    if empty:
        raise AyaConfigError(f"the tokenizer of {folder} turns the tile label(s) {empty[:3]} into no tokens; are the "
                             "checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json) missing?")
    return ids
