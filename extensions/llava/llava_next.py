"""LLaVA-NeXT (1.6) "anyres": token counts and feature packing for tiled images.

An image is resized into the best canvas of ``image_grid_pinpoints``, cut into tiles of the tower's
size, and encoded together with a squashed base image. Features are packed as: base rows first, then
the tile grid as one feature map with the padding rows/columns removed ("unpad") and one
``image_newline`` row appended to every map row (llava-formats.md §2.9).

The original LLaVA code and transformers disagree in two places and each format follows its own
reference (§5.5): which canvas wins a tie (D1, resolved in ``llava_preprocess.anyres_resolution``) and
how the unpadded size is rounded (D2: ``int(x)`` vs ``int(round(x, 7))``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_plan import ImagePlan, PlanContext, preprocess_config_for, read_image_newline
from llava_preprocess import anyres_resolution, process_anyres_image


@dataclass(frozen=True)
class AnyresGeometry:
    """Everything the token arithmetic needs. ``tile``: tower input size in pixels (336); ``side``:
    feature-map side of one tile (336 / 14 = 24); ``base_tokens``: rows of the base image (576)."""

    grid_pinpoints: Any
    tile: int
    side: int
    base_tokens: int
    hf_semantics: bool
    unpad: bool = True
    newline: bool = True

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(tiles across, tiles down)`` for an image of ``(width, height)``."""
        width, height = anyres_resolution(image_size, self.grid_pinpoints, hf_semantics=self.hf_semantics)
        return width // self.tile, height // self.tile

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        across, down = self.grid(image_size)
        return across * down

    def feature_map_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, columns)`` of the packed tile feature map, after unpadding, before newlines."""
        across, down = self.grid(image_size)
        rows, columns = down * self.side, across * self.side
        if not self.unpad:
            return rows, columns
        return unpadded_size(image_size, rows, columns, hf_semantics=self.hf_semantics)

    def tokens(self, image_size: tuple[int, int]) -> int:
        """Embedding rows for one image: base + rows x (columns + newline)."""
        rows, columns = self.feature_map_size(image_size)
        return self.base_tokens + rows * (columns + (1 if self.newline else 0))


def unpadded_size(image_size: tuple[int, int], rows: int, columns: int, *, hf_semantics: bool) -> tuple[int, int]:
    """Rows and columns of a ``rows x columns`` feature map left after removing the letterbox padding of
    an image of ``(width, height)``. Padding is floored on both sides, so one extra row can remain."""
    width, height = image_size
    if width / height > columns / rows:
        scaled = height * (columns / width)
        new_rows = int(round(scaled, 7)) if hf_semantics else int(scaled)
        padding = (rows - new_rows) // 2
        return rows - 2 * padding, columns
    scaled = width * (rows / height)
    new_columns = int(round(scaled, 7)) if hf_semantics else int(scaled)
    padding = (columns - new_columns) // 2
    return rows, columns - 2 * padding


def pack_features(features, image_size: tuple[int, int], geometry: AnyresGeometry, image_newline):
    """Pack one image's features ``[1 + tiles, side², H]`` (base first) into ``[tokens, H]``.

    ``image_newline`` ``[H]`` (or None for merge types without it) is appended to every map row.
    """
    import torch

    base, tiles = features[0], features[1:]
    across, down = geometry.grid(image_size)
    side = geometry.side
    hidden = features.shape[-1]
    if tiles.shape[0] != across * down:
        raise ValueError(f"expected {across * down} tiles for an image of {image_size[0]}x{image_size[1]}, got {tiles.shape[0]}")
    # [down, across, side, side, H] -> [H, down*side, across*side]: tiles laid out in raster order.
    grid = tiles.reshape(down, across, side, side, hidden).permute(4, 0, 2, 1, 3).reshape(hidden, down * side, across * side)
    if geometry.unpad:
        rows, columns = unpadded_size(image_size, down * side, across * side, hf_semantics=geometry.hf_semantics)
        top = (down * side - rows) // 2
        left = (across * side - columns) // 2
        grid = grid[:, top:top + rows, left:left + columns]
    if geometry.newline and image_newline is not None:
        newline = image_newline.to(grid)[:, None, None].expand(hidden, grid.shape[1], 1)
        grid = torch.cat((grid, newline), dim=-1)
    packed = grid.flatten(1, 2).transpose(0, 1)
    return torch.cat((base, packed), dim=0)


class AnyresPlan(ImagePlan):
    """LLaVA-NeXT: a squashed base tile plus the tiles of the best canvas, all through the tower in one
    batch; features packed by :func:`pack_features` (``spatial_unpad``) or simply concatenated (``flat``
    / ``spatial`` without unpadding, original checkpoints)."""

    fixed_tokens = False

    def __init__(self, spec, preprocess_config, geometry: AnyresGeometry, image_newline):
        super().__init__(spec)
        self.preprocess_config = preprocess_config
        self.geometry = geometry
        self.image_newline = image_newline

    @classmethod
    def from_checkpoint(cls, context: PlanContext) -> "AnyresPlan":
        spec, tower = context.spec, context.tower
        newline = "unpad" in spec.patch_merge_type
        geometry = AnyresGeometry(
            grid_pinpoints=spec.grid_pinpoints,
            tile=tower.image_size,
            side=tower.image_size // tower.patch_size,
            base_tokens=tower.tokens_per_image,
            hf_semantics=spec.format == "hf",
            unpad=newline,
            newline=newline,
        )
        image_newline = read_image_newline(spec, context.projector) if newline else None
        return cls(spec, preprocess_config_for(spec, context.source, tower), geometry, image_newline)

    def preprocess(self, images):
        return [process_anyres_image(image, self.preprocess_config, self.spec.grid_pinpoints,
                                     hf_semantics=self.geometry.hf_semantics) for image in images]

    def pack(self, projected, image_size):
        if self.spec.patch_merge_type == "flat":
            return projected.reshape(-1, projected.shape[-1])
        return pack_features(projected, image_size, self.geometry, self.image_newline)

    def layout(self, image_size):
        return self.image_slot(self.geometry.tokens(image_size))

    @property
    def nominal_size(self):
        return self.geometry.tile, self.geometry.tile

    def describe(self) -> str:
        return f"anyres, {self.geometry.base_tokens}+ tokens per image"
