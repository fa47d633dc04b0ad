"""LLaVA-OneVision (llava-hf ``LlavaOnevisionForConditionalGeneration``): token counts, preprocessing and
feature packing of one image, following transformers 5.6 exactly.

An image that is ALONE in its prompt is tiled as in LLaVA-NeXT (transformers semantics: pinpoints read as
(height, width), the unpadded size rounded with ``round(x, 7)``), with one extra step, ``anyres_max_N``
(``vision_aspect_ratio``): when the unpadded feature map holds more than N tiles' worth of features,
``ratio = sqrt(rows * columns / (N * side²)) > 1.1``, the map is resized bilinearly to
``(int(rows // ratio), int(columns // ratio))`` before ``image_newline`` is appended to each row. Base
features first, then the map row by row, each row ending with the newline.

Several images in one prompt are NOT tiled (the processor and the model both key on ``batch_num_images``):
each is padded to a square with the mean colour, resized to one tile, and becomes ``side²`` feature rows
plus one ``image_newline``. So an image's token count depends on its size and on how many images its
prompt holds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_checkpoint import CheckpointError
from llava_next import unpadded_size
from llava_plan import ImagePlan, PlanContext, read_image_newline
from llava_preprocess import anyres_resolution, parse_grid_pinpoints


class OnevisionConfigError(CheckpointError):
    """A OneVision config value this module cannot follow, with what was found."""


def max_tiles_of(vision_aspect_ratio: str) -> int:
    """N of ``anyres_max_N``. transformers parses it with ``str.strip("anyres_max_")``, which agrees with
    this for every well-formed value and crashes on the rest; anything else is refused here."""
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None or int(match.group(1)) <= 0:
        raise OnevisionConfigError(
            f"vision_aspect_ratio must be 'anyres_max_<N>' (e.g. anyres_max_9), got {vision_aspect_ratio!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class OnevisionGeometry:
    """The token arithmetic of one checkpoint. ``grid_pinpoints``: (height, width) canvases; ``tile``: tower
    input size in pixels; ``side``: features per tile side (``tile // patch``); ``base_tokens``: feature rows
    of one tile (``side²``, +1 when a CLS row is kept); ``max_tiles``: N of ``anyres_max_N``."""

    grid_pinpoints: tuple[tuple[int, int], ...]
    tile: int
    side: int
    base_tokens: int
    max_tiles: int

    @classmethod
    def from_config(cls, config: dict, *, tile: int, patch: int, base_tokens: int) -> "OnevisionGeometry":
        """From a ``llava_onevision`` ``config.json`` dict and the tower's geometry."""
        pinpoints = config.get("image_grid_pinpoints")
        if pinpoints is None:
            from transformers import LlavaOnevisionConfig

            pinpoints = LlavaOnevisionConfig().image_grid_pinpoints  # the class default, as the reference
        try:
            pairs = parse_grid_pinpoints(pinpoints)
        except ValueError as exc:
            raise OnevisionConfigError(str(exc)) from exc
        return cls(pairs, tile, tile // patch, base_tokens, max_tiles_of(config.get("vision_aspect_ratio", "anyres_max_9")))

    @staticmethod
    def tiled(images_in_prompt: int) -> bool:
        """Only an image alone in its prompt is tiled (``batch_num_images == 1``)."""
        return images_in_prompt == 1

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(tiles across, tiles down)`` of the canvas chosen for an image of ``(width, height)``."""
        width, height = anyres_resolution(image_size, self.grid_pinpoints, hf_semantics=True)
        return width // self.tile, height // self.tile

    def unpadded_map_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, columns)`` of the tile feature map with the letterbox padding removed."""
        across, down = self.grid(image_size)
        return unpadded_size(image_size, down * self.side, across * self.side, hf_semantics=True)

    def downscale_ratio(self, rows: int, columns: int) -> float:
        """``anyres_max_N``'s ratio; the map is resized when it exceeds 1.1."""
        return math.sqrt(rows * columns / (self.max_tiles * self.side ** 2))

    def feature_map_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, columns)`` of the packed map of a tiled image, after unpadding and any downscale."""
        rows, columns = self.unpadded_map_size(image_size)
        ratio = self.downscale_ratio(rows, columns)
        if ratio > 1.1:
            return int(rows // ratio), int(columns // ratio)
        return rows, columns

    def tokens(self, image_size: tuple[int, int], images_in_prompt: int) -> int:
        """Embedding rows of one image: ``base + rows * (columns + 1)`` tiled, ``base + 1`` otherwise."""
        if not self.tiled(images_in_prompt):
            return self.base_tokens + 1
        rows, columns = self.feature_map_size(image_size)
        return self.base_tokens + rows * (columns + 1)

    def num_tiles(self, image_size: tuple[int, int], images_in_prompt: int) -> int:
        """Tower inputs of one image: the base tile plus the grid when tiled."""
        if not self.tiled(images_in_prompt):
            return 1
        across, down = self.grid(image_size)
        return 1 + across * down


def pack_features(features, image_size: tuple[int, int], images_in_prompt: int, geometry: OnevisionGeometry,
                  image_newline):
    """One image's projected features -> its embedding rows ``[geometry.tokens(...), H]``.

    ``features``: ``[num_tiles, base_tokens, H]``, the base tile first (``num_tiles`` as
    :meth:`OnevisionGeometry.num_tiles`). ``image_newline``: ``[H]``. The operations and their order are
    transformers' ``LlavaOnevisionModel.pack_image_features``, so results are bit-identical.
    """
    import torch
    from torch.nn import functional as F

    expected = geometry.num_tiles(image_size, images_in_prompt)
    if features.shape[0] != expected:
        raise ValueError(f"expected {expected} tile feature maps for a {image_size[0]}x{image_size[1]} image, "
                         f"got {features.shape[0]}")
    newline = image_newline.to(device=features.device, dtype=features.dtype)
    if not geometry.tiled(images_in_prompt):
        return torch.cat((features[0], newline[None]), dim=0)
    base, tiles = features[0], features[1:]
    side = geometry.side
    if base.shape[0] != side * side:
        raise ValueError(f"tiling needs {side * side} feature rows per tile (no CLS row), got {base.shape[0]}")
    across, down = geometry.grid(image_size)
    # [down, across, side, side, H] -> [H, down * side, across * side]: tiles in raster order.
    grid = tiles.view(down, across, side, side, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    rows, columns = unpadded_size(image_size, grid.shape[1], grid.shape[2], hf_semantics=True)
    top, left = (grid.shape[1] - rows) // 2, (grid.shape[2] - columns) // 2
    grid = grid[:, top:grid.shape[1] - top, left:grid.shape[2] - left]
    ratio = geometry.downscale_ratio(grid.shape[1], grid.shape[2])
    if ratio > 1.1:
        grid = F.interpolate(grid[None], [int(grid.shape[1] // ratio), int(grid.shape[2] // ratio)], mode="bilinear")[0]
    grid = torch.cat((grid, newline[:, None, None].expand(*grid.shape[:-1], 1)), dim=-1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


class OnevisionPreprocessor:
    """Pixels of one image, bit-identical to transformers' ``LlavaOnevisionImageProcessorPil`` (which it
    runs; no torchvision needed): ``[num_tiles, 3, tile, tile]`` float32, the base tile first."""

    def __init__(self, folder: str | Path):
        from transformers import LlavaOnevisionImageProcessorPil

        # from_pretrained reads preprocessor_config.json (hub layout) or the settings nested in
        # processor_config.json (transformers 5 saves); local files only, never the network.
        self._processor = LlavaOnevisionImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        self.grid_pinpoints = self._processor.image_grid_pinpoints

    @property
    def tile_size(self) -> tuple[int, int]:
        size = self._processor.size
        return (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2

    def __call__(self, image: Any, *, images_in_prompt: int):
        import numpy as np
        import torch
        from transformers.image_processing_utils import BaseImageProcessor

        # The class's own `preprocess` derives `batch_num_images` from the nesting of its input; passing it
        # to the base implementation directly preprocesses this one image as the member of a prompt with
        # `images_in_prompt` images (tiled only when alone), exactly as the processor would in that batch.
        output = BaseImageProcessor.preprocess(self._processor, [image], [1 if images_in_prompt == 1 else 2])
        return torch.from_numpy(np.ascontiguousarray(output["pixel_values"][0]))


class OnevisionPlan(ImagePlan):
    """The image plan of a LLaVA-OneVision checkpoint, for prompts holding ``images_in_prompt`` images:
    :meth:`for_prompt` gives the variant for another count (tiled when alone, one tile otherwise)."""

    fixed_tokens = False

    def __init__(self, spec, geometry: OnevisionGeometry, preprocessor: OnevisionPreprocessor, image_newline,
                 images_in_prompt: int = 1):
        super().__init__(spec)
        self.geometry = geometry
        self.preprocessor = preprocessor
        self.image_newline = image_newline
        self.images_in_prompt = images_in_prompt
        self.cache_tag = "tiled" if geometry.tiled(images_in_prompt) else "one tile"

    @classmethod
    def from_checkpoint(cls, context: PlanContext) -> "OnevisionPlan":
        spec, tower = context.spec, context.tower
        geometry = OnevisionGeometry.from_config(spec.raw_config, tile=tower.image_size, patch=tower.patch_size,
                                                 base_tokens=tower.tokens_per_image)
        preprocessor = OnevisionPreprocessor(spec.model_dir)
        # The processor counts and tiles with its own settings, the model packs with its config's: the
        # reference itself fails on a checkpoint where they disagree, so refuse it at load.
        if tuple(map(tuple, preprocessor.grid_pinpoints)) != geometry.grid_pinpoints:
            raise OnevisionConfigError(f"{spec.model_dir}: the image processor's image_grid_pinpoints differ from "
                                       "config.json's; the checkpoint is inconsistent")
        if preprocessor.tile_size != (geometry.tile, geometry.tile):
            raise OnevisionConfigError(f"{spec.model_dir}: the image processor makes {preprocessor.tile_size} tiles, "
                                       f"the vision tower takes {geometry.tile}x{geometry.tile}")
        processor_file = Path(spec.model_dir) / "processor_config.json"
        declared = json.loads(processor_file.read_text()).get("num_image_tokens") if processor_file.is_file() else None
        if declared is not None and declared != geometry.base_tokens:
            raise OnevisionConfigError(f"{spec.model_dir}: processor_config.json counts {declared} tokens per tile, "
                                       f"the vision tower gives {geometry.base_tokens}")
        return cls(spec, geometry, preprocessor, read_image_newline(spec, context.projector))

    def for_prompt(self, image_count: int) -> "OnevisionPlan":
        if self.geometry.tiled(image_count) == self.geometry.tiled(self.images_in_prompt):
            return self
        return OnevisionPlan(self.spec, self.geometry, self.preprocessor, self.image_newline, image_count)

    def preprocess(self, images):
        return [self.preprocessor(image, images_in_prompt=self.images_in_prompt) for image in images]

    def pack(self, projected, image_size):
        return pack_features(projected, image_size, self.images_in_prompt, self.geometry, self.image_newline)

    def layout(self, image_size):
        return self.image_slot(self.geometry.tokens(image_size, self.images_in_prompt))

    @property
    def nominal_size(self):
        return self.geometry.tile, self.geometry.tile

    def describe(self) -> str:
        return (f"anyres_max_{self.geometry.max_tiles}, {self.geometry.base_tokens}+ tokens per image alone in its "
                f"prompt, {self.geometry.base_tokens + 1} each with several")


def config_fields(config: dict) -> dict:
    """``LlavaSpec`` fields of a ``llava_onevision`` config, refusing what the reference cannot run."""
    max_tiles_of(config.get("vision_aspect_ratio", "anyres_max_9"))
    strategy = config.get("vision_feature_select_strategy") or "full"
    vision_type = (config.get("vision_config") or {}).get("model_type", "siglip_vision_model")
    if strategy == "default" and vision_type == "siglip_vision_model":
        raise OnevisionConfigError(
            "vision_feature_select_strategy 'default' drops a CLS row, which a SigLIP tower does not have; "
            "transformers cannot tile such a checkpoint either (expected 'full')")
    pinpoints = config.get("image_grid_pinpoints")
    try:
        parsed = parse_grid_pinpoints(pinpoints) if pinpoints is not None else ()
    except ValueError as exc:
        raise OnevisionConfigError(str(exc)) from exc
    return {"anyres": True, "patch_merge_type": "spatial_unpad", "grid_pinpoints": parsed}
