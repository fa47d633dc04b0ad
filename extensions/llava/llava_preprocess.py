"""CLIP image preprocessing for LLaVA: RGB PIL image in, normalised float32 `[3, H, W]` tensor out.

Bit-identical (``torch.equal``) to transformers' PIL backend, `CLIPImageProcessorPil` (resize + center
crop) and `LlavaImageProcessorPil(do_pad=True)` (pad to square first), which in turn are bit-identical to
the transformers 4.37.2 slow `CLIPImageProcessor` that original LLaVA ran (llava-formats.md §6). The
reference arithmetic, step by step:

1. pad (optional): square canvas of side max(W, H) filled with ``tuple(int(m * 255) for m in image_mean)``
   (122, 116, 104 for CLIP), image pasted at ``((side - W) // 2, (side - H) // 2)`` (original
   ``expand2square``).
2. resize: ``shortest_edge`` S → the short side becomes S, the long side ``int(S * long / short)``
   (truncated); or an exact ``(height, width)``. PIL ``Image.resize`` with the configured filter on uint8.
3. center crop: ``top = (H - ch) // 2``, ``left = (W - cw) // 2``; a side smaller than the crop is
   zero-padded, the image placed at ``ceil((c - H) / 2)``.
4. rescale: ``float32(float64(v) * rescale_factor)``.
5. normalise: float32 ``(x - float32(mean)) / float32(std)``.

How this module is faster without changing a bit:

* Steps 4-5 map each uint8 value of each channel to one float32, so they become a 3×256 lookup table
  built once per config with exactly that arithmetic in numpy, applied with one gather per channel.
* Pad and crop happen on uint8 (PIL or numpy), before any float work, and only the kept window is
  normalised.
* The resize is still PIL's own kernel (the reference), split into its two 1-D passes. For PIL's
  convolution filters (BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS) a resize that changes both sides runs
  one pass into a uint8 intermediate, then the other; a horizontal-only resize followed by a
  vertical-only one (or the reverse, matching the order this Pillow version picks, `_pil_pass_order`)
  is the same computation. Each pass treats rows (horizontal) or columns (vertical) independently, with
  coefficients that depend only on the input and output lengths, so a pass may run on a subset of rows
  or columns, and in parallel threads (PIL releases the GIL while resampling; the calling thread takes a
  share). Only the rows or columns the crop keeps are resampled by the second pass and read by the first;
  a pass also stops after the last output the crop keeps where PIL provably places the samples the same
  (`_pass_extent`: 4:3 photos, most 3:2 ones), and the uniform background rows of a padded landscape
  image are resampled once. A one-time self-check (`_pass_split_verified`) falls back to plain
  `Image.resize` if this Pillow behaves otherwise, and the tests compare every path with the reference
  processors using ``torch.equal``.

Also here: LLaVA-NeXT "anyres" tiling (`process_anyres_image`) in both the original LLaVA and the
transformers semantics (llava-formats.md §2.9, divergence D1).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import logging
import math
import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import PIL
import torch
from PIL import Image

from llava_image_io import run_parallel, worker_threads

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL filters resampled by the two-pass convolution code (the pass split above is valid for these).
# NEAREST and the newer MKS filters take a plain single `Image.resize` call.
_TWO_PASS_FILTERS = frozenset({
    Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.HAMMING,
    Image.Resampling.BICUBIC, Image.Resampling.LANCZOS,
})
_VALID_FILTERS = frozenset(int(f) for f in Image.Resampling)
# Largest support (in input pixels at scale 1) among the two-pass filters (LANCZOS: 3); used with a
# safety margin to decide which intermediate rows a window of output rows reads.
_MAX_FILTER_SUPPORT = 3.0
_SUPPORT_MARGIN = 2

# Resizes whose full output would exceed this many pixels compute only the cropped window
# (`_windowed_resize`): only extreme aspect ratios, where the reference's full resize (336×6.7 M
# pixels for a 1×20000 image) is out of proportion to the image.
_FULL_RESIZE_MAX_PIXELS = 1 << 24
# Pad-to-square is bit-identical to the reference for every canvas up to this side (16384² = 268 M
# pixels, 805 MB of RGB in the reference's `expand2square`). Beyond it the reference needs more memory
# than a user's machine can be assumed to have, and the image is first shrunk to this long side
# (`_shrink_for_padding`): the one documented deviation of the pad path.
PAD_MAX_SIDE = 16384

# Below this many output pixels per pass, thread hand-off costs more than it saves.
_MIN_PIXELS_PER_THREAD = 32_768


@dataclass(frozen=True)
class PreprocessConfig:
    """CLIP preprocessing settings (defaults are `CLIPImageProcessor`'s: 224 px, bicubic, OpenAI stats).

    Resize target: exactly one of ``shortest_edge`` or (``size_height``, ``size_width``).
    ``pad_to_square`` is LLaVA-1.5's ``image_aspect_ratio == "pad"`` (``expand2square``) — it comes
    from the model config, not from ``preprocessor_config.json``.
    """

    shortest_edge: int | None = 224
    size_height: int | None = None
    size_width: int | None = None
    crop_height: int = 224
    crop_width: int = 224
    do_center_crop: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    pad_to_square: bool = False

    def __post_init__(self) -> None:
        has_exact = self.size_height is not None or self.size_width is not None
        if (self.shortest_edge is None) == (not has_exact) or (
            has_exact and (self.size_height is None or self.size_width is None)
        ):
            raise ValueError(
                "PreprocessConfig needs either shortest_edge or both size_height and size_width, got "
                f"shortest_edge={self.shortest_edge}, size_height={self.size_height}, size_width={self.size_width}"
            )
        for field_name in ("shortest_edge", "size_height", "size_width", "crop_height", "crop_width"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"PreprocessConfig.{field_name} must be a positive int, got {value!r}")
        if self.resample not in _VALID_FILTERS:
            raise ValueError(f"PreprocessConfig.resample must be a PIL filter id {sorted(_VALID_FILTERS)}, "
                             f"got {self.resample!r}")
        object.__setattr__(self, "resample", int(self.resample))
        if not (isinstance(self.rescale_factor, (int, float)) and math.isfinite(self.rescale_factor)
                and self.rescale_factor > 0):
            raise ValueError(f"PreprocessConfig.rescale_factor must be a positive number, got {self.rescale_factor!r}")
        for field_name in ("image_mean", "image_std"):
            object.__setattr__(self, field_name, _three_floats(getattr(self, field_name), field_name))
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"PreprocessConfig.image_std must not contain 0, got {self.image_std}")
        if not self.do_center_crop and self.shortest_edge is not None and not self.pad_to_square:
            raise ValueError(
                "PreprocessConfig: shortest_edge resize without center crop or pad_to_square gives an output "
                "size that depends on the image; the vision tower needs a fixed size"
            )

    @property
    def expected_size(self) -> tuple[int, int]:
        """(height, width) of every tensor `preprocess` returns."""
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        if self.shortest_edge is None:
            return self.size_height, self.size_width
        return self.shortest_edge, self.shortest_edge  # padded square, resized

    @classmethod
    def from_processor_dict(cls, processor_dict: dict[str, Any], *, pad_to_square: bool) -> "PreprocessConfig":
        """Build from a Hugging Face ``preprocessor_config.json`` dict (CLIP / LLaVA / LLaVA-NeXT).

        ``size`` may be an int (shortest edge, unless ``default_to_square`` is true), ``{"shortest_edge"}``,
        ``{"height", "width"}`` or ``[height, width]``; ``crop_size`` an int, a dict or a list. Missing or
        null keys take `CLIPImageProcessor`'s defaults. Metadata keys are ignored, and so are ``do_pad``
        (its meaning differs between processor classes; ``pad_to_square`` decides) and
        ``image_grid_pinpoints`` (read by the anyres caller). A setting this module does not implement
        (e.g. ``do_normalize: false``, ``size.longest_edge``) raises ValueError naming it; keys it does not
        know are logged and ignored.
        """
        # A null value means "unset, use the default" in transformers (`_set_attributes`); processors
        # saved by recent versions write many runtime options (device, return_tensors, ...) as null.
        settings = {key: value for key, value in processor_dict.items() if value is not None}
        for key in _IGNORED_PROCESSOR_KEYS:
            settings.pop(key, None)
        for key, required in (("do_resize", True), ("do_rescale", True), ("do_normalize", True)):
            if key in settings and settings.pop(key) is not required:
                raise ValueError(f"preprocessor config: {key}={processor_dict[key]!r} is not supported "
                                 f"(only {required})")
        # We always feed RGB (llava_image_io converts), so do_convert_rgb cannot change the result.
        _bool_setting(settings.pop("do_convert_rgb", True), "do_convert_rgb")
        default_to_square = settings.pop("default_to_square", False)
        if not isinstance(default_to_square, bool):
            raise ValueError(f"preprocessor config: default_to_square must be a bool, got {default_to_square!r}")
        data_format = settings.pop("data_format", "channels_first")
        if data_format not in ("channels_first", None):
            raise ValueError(f"preprocessor config: data_format={data_format!r} is not supported (only channels_first)")

        kwargs: dict[str, Any] = {"pad_to_square": pad_to_square}
        shortest_edge, height, width = _parse_size(settings.pop("size", {"shortest_edge": 224}),
                                                   default_to_square=default_to_square)
        kwargs.update(shortest_edge=shortest_edge, size_height=height, size_width=width)
        crop = settings.pop("crop_size", {"height": 224, "width": 224})
        kwargs["crop_height"], kwargs["crop_width"] = _parse_crop_size(crop)
        if "do_center_crop" in settings:
            kwargs["do_center_crop"] = _bool_setting(settings.pop("do_center_crop"), "do_center_crop")
        if "resample" in settings:
            resample = settings.pop("resample")
            if isinstance(resample, bool) or not isinstance(resample, int) or resample not in _VALID_FILTERS:
                raise ValueError(f"preprocessor config: resample={resample!r} is not a PIL filter id")
            kwargs["resample"] = resample
        if "rescale_factor" in settings:
            kwargs["rescale_factor"] = settings.pop("rescale_factor")
        if "image_mean" in settings:
            kwargs["image_mean"] = _three_floats(settings.pop("image_mean"), "image_mean")
        if "image_std" in settings:
            kwargs["image_std"] = _three_floats(settings.pop("image_std"), "image_std")
        for key in _ARITHMETIC_KEYS:
            if key in settings:
                raise ValueError(f"preprocessor config: {key}={settings[key]!r} is not supported")
        if settings:
            # Processor files carry options of other processor classes and versions (e.g.
            # `image_seq_length`); ones that would change the arithmetic are checked above.
            logger.warning("preprocessor config: ignoring keys this preprocessing does not use: %s", sorted(settings))
        return cls(**kwargs)


# Options of other processor classes that would change the pixels: refused rather than ignored.
_ARITHMETIC_KEYS = ("crop_pct", "do_flip_channel_order", "rescale_offset", "do_convert_grayscale")

# Keys that describe the file rather than the arithmetic, or that belong to another stage.
_IGNORED_PROCESSOR_KEYS = (
    "image_processor_type", "feature_extractor_type", "processor_class", "_processor_class",
    "_valid_processor_keys", "do_pad", "image_grid_pinpoints",
)


def _bool_setting(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"preprocessor config: {key} must be a bool, got {value!r}")
    return value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"preprocessor config: {key} must be a positive int, got {value!r}")
    return value


def _parse_size(size: Any, *, default_to_square: bool) -> tuple[int | None, int | None, int | None]:
    """→ (shortest_edge, height, width) with exactly one form set."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = _positive_int(size, "size")
        return (None, size, size) if default_to_square else (size, None, None)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return None, _positive_int(size[0], "size[0]"), _positive_int(size[1], "size[1]")
    if isinstance(size, dict):
        keys = set(size)
        if keys == {"shortest_edge"}:
            return _positive_int(size["shortest_edge"], "size.shortest_edge"), None, None
        if keys == {"height", "width"}:
            return None, _positive_int(size["height"], "size.height"), _positive_int(size["width"], "size.width")
        allowed = {"shortest_edge"} if "shortest_edge" in keys else {"height", "width"}
        extra, missing = sorted(keys - allowed), sorted(allowed - keys)
        problem = f"size.{extra[0]} is not supported" if extra else f"size lacks {missing[0]!r}"
        raise ValueError(f"preprocessor config: {problem}; size must be {{'shortest_edge'}} or "
                         f"{{'height', 'width'}}, got {size!r}")
    raise ValueError(f"preprocessor config: size={size!r} is not an int, [height, width] or a size dict")


def _parse_crop_size(crop: Any) -> tuple[int, int]:
    if isinstance(crop, int) and not isinstance(crop, bool):
        crop = _positive_int(crop, "crop_size")
        return crop, crop
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return _positive_int(crop[0], "crop_size[0]"), _positive_int(crop[1], "crop_size[1]")
    if isinstance(crop, dict) and set(crop) == {"height", "width"}:
        return _positive_int(crop["height"], "crop_size.height"), _positive_int(crop["width"], "crop_size.width")
    raise ValueError(f"preprocessor config: crop_size={crop!r} must be an int, [height, width] or "
                     "{'height', 'width'}")


def _three_floats(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3  # a scalar applies to every channel, as in transformers
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in value)


# --- single image ----------------------------------------------------------------------------------


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """One image → float32 tensor ``[3, *cfg.expected_size]`` (channels R, G, B).

    ``image`` should be RGB (from `llava_image_io.load_image`); other modes get ``convert("RGB")``
    like the reference processors.
    """
    out = np.empty((3, *cfg.expected_size), dtype=np.float32)
    _preprocess_into(image, cfg, out)
    return torch.from_numpy(out)


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """Several images → float32 ``[B, 3, *cfg.expected_size]`` (B may be 0)."""
    batch = np.empty((len(images), 3, *cfg.expected_size), dtype=np.float32)
    for index, image in enumerate(images):
        _preprocess_into(image, cfg, batch[index])
    return torch.from_numpy(batch)


def _preprocess_into(image: Image.Image, cfg: PreprocessConfig, out: np.ndarray) -> None:
    """Write the preprocessed image into float32 ``out`` ``[3, *cfg.expected_size]``."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"cannot preprocess an image with no pixels ({image.width}x{image.height})")
    if image.mode != "RGB":
        image = image.convert("RGB")
    image.load()  # before any worker thread reads it (a lazily opened image would load concurrently)
    pixels = _resize_and_crop_uint8(image, cfg)  # [h, w, 3] uint8
    table = _normalization_table(cfg.rescale_factor, cfg.image_mean, cfg.image_std)  # [3, 256]
    for channel in range(3):
        # uint8 indices are always within the 256 entries; "clip" just skips numpy's bounds buffering.
        np.take(table[channel], pixels[:, :, channel], out=out[channel], mode="clip")


@functools.lru_cache(maxsize=16)
def _normalization_table(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 ``[3, 256]``: entry [c, v] is the reference's rescale + normalise of value v in channel c.

    Same numpy operations and dtypes as transformers' PIL backend: ``astype(float64) * factor`` then
    ``astype(float32)``; then float32 ``(x - mean) / std`` with mean/std cast to float32. Read-only,
    since the cached array is shared.
    """
    values = np.arange(256, dtype=np.uint8)
    rescaled = (values.astype(np.float64) * rescale_factor).astype(np.float32)  # [256]
    mean32 = np.array(mean, dtype=np.float32)[:, None]  # [3, 1]
    std32 = np.array(std, dtype=np.float32)[:, None]
    table = np.ascontiguousarray((rescaled[None, :] - mean32) / std32, dtype=np.float32)  # [3, 256]
    table.flags.writeable = False
    return table


def _resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) after the resize step, as transformers' `get_resize_output_image_size`."""
    if cfg.shortest_edge is None:
        return cfg.size_width, cfg.size_height
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(cfg.shortest_edge * long / short)  # truncation, as the reference
    return (cfg.shortest_edge, new_long) if width <= height else (new_long, cfg.shortest_edge)


def _crop_window(size: int, crop: int) -> tuple[int, int, int]:
    """For one axis: (first kept index, number kept, offset of the kept part inside the crop)."""
    if size >= crop:
        return (size - crop) // 2, crop, 0
    return 0, size, math.ceil((crop - size) / 2)  # image smaller than the crop: zero-padded around it


def _resize_and_crop_uint8(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Steps 1-3 (pad, resize, center crop) on uint8: ``[h, w, 3]`` with (h, w) = cfg.expected_size."""
    if cfg.pad_to_square:
        image = _shrink_for_padding(image)
    width, height = image.size
    padded = cfg.pad_to_square and width != height
    in_w, in_h = (max(width, height),) * 2 if padded else (width, height)
    out_w, out_h = _resized_size(in_w, in_h, cfg)

    if cfg.do_center_crop:
        row0, n_rows, row_at = _crop_window(out_h, cfg.crop_height)
        col0, n_cols, col_at = _crop_window(out_w, cfg.crop_width)
    else:
        row0, n_rows, row_at, col0, n_cols, col_at = 0, out_h, 0, 0, out_w, 0

    background = tuple(int(m * 255) for m in cfg.image_mean) if padded else None
    source = _PaddedSource(image, in_w, in_h, background)
    window = _resize_window(source, (out_w, out_h), (row0, row0 + n_rows), (col0, col0 + n_cols), cfg.resample)

    if window.shape[:2] == cfg.expected_size:
        return window
    result = np.zeros((cfg.crop_height, cfg.crop_width, 3), dtype=np.uint8)
    result[row_at:row_at + n_rows, col_at:col_at + n_cols] = window
    return result


def _shrink_for_padding(image: Image.Image) -> Image.Image:
    """An image whose padded square would exceed `PAD_MAX_SIDE`² is downscaled (aspect kept) to that
    long side before padding; every smaller image is returned as it is, so that padding and resizing it
    are bit-identical to the reference. (A 1×20000 image pads to 400 M pixels, 1.2 GB of RGB in the
    reference.)"""
    width, height = image.size
    side = max(width, height)
    if side <= PAD_MAX_SIDE:
        return image
    scale = PAD_MAX_SIDE / side
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BOX)


def _pad_image(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Original LLaVA `expand2square`: same mode, square of side max(W, H), image centred (floor)."""
    width, height = image.size
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class _PaddedSource:
    """The resize input (the image, or it padded to a square) handing out row bands without building it whole."""

    def __init__(self, image: Image.Image, width: int, height: int, background: tuple[int, int, int] | None):
        self.image = image
        self.width, self.height = width, height
        self.background = background
        self.offset_x = (width - image.width) // 2
        self.offset_y = (height - image.height) // 2
        # Padded above and below only: rows outside the image are uniform background rows.
        self.full_width_rows = image.width == width

    def full(self) -> Image.Image:
        return self.image if self.background is None else _pad_image(self.image, self.background)

    def image_rows(self) -> tuple[int, int]:
        """Rows [first, last) that hold image pixels; all others are uniform background rows."""
        if self.background is None or not self.full_width_rows:
            return 0, self.height
        return self.offset_y, self.offset_y + self.image.height

    def rows(self, first: int, last: int) -> Image.Image:
        """Rows [first, last) (within `image_rows`) as a PIL image ``width × (last - first)``."""
        if self.full_width_rows:
            top, bottom = first - self.offset_y, last - self.offset_y
            if (top, bottom) == (0, self.image.height):
                return self.image  # resize never modifies its input: skip the copy
            return self.image.crop((0, top, self.width, bottom))
        band = Image.new("RGB", (self.width, last - first), self.background)
        band.paste(self.image.crop((0, first, self.image.width, last)), (self.offset_x, 0))
        return band


def _resize_window(source: _PaddedSource, out_size: tuple[int, int], keep_rows: tuple[int, int],
                   keep_cols: tuple[int, int], resample: int) -> np.ndarray:
    """``source`` resized by PIL to out_size (w, h), only rows/cols in the keep ranges: uint8 ``[h', w', 3]``."""
    out_w, out_h = out_size
    if out_w * out_h > _FULL_RESIZE_MAX_PIXELS and resample in _TWO_PASS_FILTERS:
        return _windowed_resize(source, out_size, keep_rows, keep_cols, resample)
    horizontal, vertical = out_w != source.width, out_h != source.height
    order = _pil_pass_order(source.width, source.height, out_w, out_h) if horizontal and vertical else "H"
    if resample not in _TWO_PASS_FILTERS or order is None or not _pass_split_verified():
        resized = np.asarray(source.full().resize(out_size, resample))
        return resized[keep_rows[0]:keep_rows[1], keep_cols[0]:keep_cols[1]]
    if order == "H":
        return _horizontal_then_vertical(source, out_w, out_h, keep_rows, keep_cols, resample)
    return _vertical_then_horizontal(source.full(), out_w, out_h, keep_rows, keep_cols, resample)


def _windowed_resize(source: _PaddedSource, out_size: tuple[int, int], keep_rows: tuple[int, int],
                     keep_cols: tuple[int, int], resample: int) -> np.ndarray:
    """Only the kept window of a resize whose full output would be huge (shortest edge 336 turns a 1×20000
    image into 336×6.7 M pixels, of which the crop keeps 336×336).

    PIL resamples just the input region the window reads, given as a float ``box``: the same filter at
    the same scale, but with sample positions computed relative to the region, so a value can differ
    from the full resize by a rounding step. Only images whose full resize exceeds
    `_FULL_RESIZE_MAX_PIXELS` take this path (aspect ratios beyond ~148:1 at 336 px).
    """
    out_w, out_h = out_size
    x0, x1 = _span_read(source.width, out_w, keep_cols)
    y0, y1 = _span_read(source.height, out_h, keep_rows)
    if source.background is None:
        region = source.image.crop((x0, y0, x1, y1))
    else:
        region = Image.new("RGB", (x1 - x0, y1 - y0), source.background)
        region.paste(source.image, (source.offset_x - x0, source.offset_y - y0))
    scale_x, scale_y = source.width / out_w, source.height / out_h
    box = (keep_cols[0] * scale_x - x0, keep_rows[0] * scale_y - y0,
           min(keep_cols[1] * scale_x, x1) - x0, min(keep_rows[1] * scale_y, y1) - y0)
    size = (keep_cols[1] - keep_cols[0], keep_rows[1] - keep_rows[0])
    return np.asarray(region.resize(size, resample, box=box))


def _horizontal_then_vertical(source: _PaddedSource, out_w: int, out_h: int, keep_rows: tuple[int, int],
                              keep_cols: tuple[int, int], resample: int) -> np.ndarray:
    """Horizontal pass on the rows the kept output rows read, vertical pass on the kept columns."""
    in_h = source.height
    col0, col1 = keep_cols
    vertical = out_h != in_h
    # Intermediate rows that the kept output rows read; rows never read stay black (never used).
    need0, need1 = _span_read(in_h, out_h, keep_rows) if vertical else keep_rows
    base = 0 if vertical else need0  # intermediate row index = source row - base
    intermediate = Image.new("RGB", (col1 - col0, in_h if vertical else need1 - need0))

    image0, image1 = source.image_rows()
    # Background rows (image padded above/below) are identical after the horizontal pass: do one.
    background_bands = [(need0, min(need1, image0)), (max(need0, image1), need1)]
    if any(first < last for first, last in background_bands):
        line = Image.new("RGB", (source.width, 1), source.background)
        background_row = _horizontal(line, out_w, keep_cols, resample)
        for first, last in background_bands:
            if first < last:
                # NEAREST stretching of one row copies it exactly.
                filler = background_row.resize((col1 - col0, last - first), Image.Resampling.NEAREST)
                intermediate.paste(filler, (0, first - base))
    band0, band1 = max(need0, image0), min(need1, image1)

    def horizontal(bounds: tuple[int, int]) -> None:
        band = _horizontal(source.rows(*bounds), out_w, keep_cols, resample)
        intermediate.paste(band, (0, bounds[0] - base))  # chunks write disjoint rows

    if band1 > band0:
        run_parallel(horizontal, _split(band0, band1, (band1 - band0) * out_w))
    if not vertical:
        return np.asarray(intermediate)
    return _vertical(intermediate, out_h, keep_rows, resample)


def _vertical_then_horizontal(image: Image.Image, out_w: int, out_h: int, keep_rows: tuple[int, int],
                              keep_cols: tuple[int, int], resample: int) -> np.ndarray:
    """Mirror image of the above: vertical pass on the columns the kept output columns read, horizontal
    pass on the kept output rows."""
    need0, need1 = _span_read(image.width, out_w, keep_cols)
    strip = Image.fromarray(_vertical(image.crop((need0, 0, need1, image.height)), out_h, keep_rows, resample))
    intermediate = Image.new("RGB", (image.width, strip.height))  # columns never read stay black
    intermediate.paste(strip, (need0, 0))
    output = Image.new("RGB", (keep_cols[1] - keep_cols[0], strip.height))

    def horizontal(bounds: tuple[int, int]) -> None:
        band = _horizontal(intermediate.crop((0, bounds[0], image.width, bounds[1])), out_w, keep_cols, resample)
        output.paste(band, (0, bounds[0]))

    run_parallel(horizontal, _split(0, strip.height, strip.height * out_w))
    return np.asarray(output)


def _span_read(in_size: int, out_size: int, keep: tuple[int, int]) -> tuple[int, int]:
    """Input indices [first, last) that outputs keep[0]..keep[1]-1 of a 1-D resampling pass may read.

    Mirrors PIL's coefficient bounds: output i is centred at (i + 0.5) * scale and reads inputs within
    support * max(scale, 1) of it; we use the widest filter's support plus a margin, so the range is a
    safe superset whatever the filter.
    """
    scale = in_size / out_size
    support = _MAX_FILTER_SUPPORT * max(scale, 1.0)
    first = math.floor((keep[0] + 0.5) * scale - support) - _SUPPORT_MARGIN
    last = math.ceil((keep[1] - 0.5) * scale + support) + _SUPPORT_MARGIN
    return max(first, 0), min(last, in_size)


def _horizontal(band: Image.Image, out_w: int, keep_cols: tuple[int, int], resample: int) -> Image.Image:
    """Columns ``keep_cols`` of a horizontal-only PIL resize of ``band`` to width ``out_w`` (same height)."""
    col0, col1 = keep_cols
    height = band.height
    if band.width == out_w:
        resized = band
    else:
        outputs, source_end = _pass_extent(band.width, out_w, col1)
        resized = band.resize((outputs, height), resample, box=(0, 0, source_end, height))
    return resized if keep_cols == (0, resized.width) else resized.crop((col0, 0, col1, height))


def _vertical(image: Image.Image, out_h: int, keep_rows: tuple[int, int], resample: int) -> np.ndarray:
    """Rows ``keep_rows`` of a vertical-only PIL resize (same width) → uint8 ``[rows kept, width, 3]``,
    split by columns across threads."""
    row0, row1 = keep_rows
    if image.height == out_h:
        return np.asarray(image)[row0:row1]
    outputs, source_end = _pass_extent(image.height, out_h, row1)
    output = np.empty((row1 - row0, image.width, 3), dtype=np.uint8)

    def vertical(bounds: tuple[int, int]) -> None:
        strip = image.crop((bounds[0], 0, bounds[1], image.height))
        width = bounds[1] - bounds[0]
        resized = strip.resize((width, outputs), resample, box=(0, 0, width, source_end))
        output[:, bounds[0]:bounds[1]] = np.asarray(resized)[row0:row1]

    run_parallel(vertical, _split(0, image.width, (row1 - row0) * image.width))
    return output


@functools.lru_cache(maxsize=256)
def _pass_extent(in_size: int, out_size: int, needed: int) -> tuple[int, float]:
    """How much of a 1-D PIL resampling pass of ``in_size`` inputs to ``out_size`` outputs to run when only
    its first ``needed`` outputs are used: ``(outputs, end)`` for ``resize`` to ``outputs`` with the box
    ``[0, end)``. ``(needed, needed * in_size / out_size)`` where that gives, bit for bit, the full pass's
    first ``needed`` outputs; else the whole pass, ``(out_size, in_size)``.

    PIL (``precompute_coeffs`` in libImaging/Resample.c) centres output ``i`` at ``in0 + (i + 0.5) * scale``
    with ``scale = (double)(in1 - in0) / outputs`` and the box edges ``in0``, ``in1`` single-precision
    floats; each output's input bounds, kernel weights, their sum and its fixed-point coefficients are
    functions of that centre, ``scale`` and ``in_size`` alone. With ``in0 = 0`` the centres are the full
    pass's whenever the scale is the same double: when ``end = needed * in_size / out_size`` is exactly a
    float32 (a 1024×768 photo at 336 px: 392 of 448 columns, ``end`` 896.0; 4:3 photos in general, most 3:2
    ones, not 16:9 ones). A box that starts past 0 could round the centres differently, so the columns
    before the crop are always computed.
    """
    whole_pass = out_size, float(in_size)
    if not 0 < needed < out_size:
        return whole_pass
    end = Fraction(needed * in_size, out_size)
    if not _is_float32(end) or float(end) / needed != in_size / out_size:
        return whole_pass
    return needed, float(end)


def _is_float32(value: Fraction) -> bool:
    """Is the rational ``value`` exactly a (finite) single-precision float?"""
    if value.denominator & (value.denominator - 1):  # not a power of two
        return False
    as_double = float(value)
    return Fraction(as_double) == value and struct.unpack("f", struct.pack("f", as_double))[0] == as_double


def _split(first: int, last: int, work: int) -> list[tuple[int, int]]:
    """Split [first, last) into as many near-equal chunks as threads are worth for `work` output pixels."""
    count = max(1, min(worker_threads(), work // _MIN_PIXELS_PER_THREAD, last - first))
    edges = [first + (last - first) * i // count for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


def _pil_pass_order(in_w: int, in_h: int, out_w: int, out_h: int) -> str | None:
    """Which pass the installed Pillow runs first when a resize changes both sides: "H", "V" or None.

    Read from Pillow's sources (`ImagingResampleInner` in libImaging/Resample.c, `Image.resize`):
    up to 12.1 always horizontal first; 12.2-12.3 vertical first for images over 100× taller than wide
    that shrink in height; 13.0 vertical first when the height shrinks by more than twice what the
    width does. None for versions not read (the caller then resizes in one plain PIL call).
    """
    version = _pillow_version()
    if version is None or version > (13, 0):
        return None
    if version < (12, 2):
        return "H"
    if version < (13, 0):
        return "V" if in_h > in_w * 100 and out_h < in_h else "H"
    shrink_h, shrink_w = in_h - out_h, in_w - out_w
    return "V" if shrink_h > 0 and shrink_h > shrink_w * 2 else "H"


@functools.lru_cache(maxsize=1)
def _pillow_version() -> tuple[int, int] | None:
    """(major, minor) of a Pillow release; None for dev/post builds, whose resampling we have not read."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.\d+", PIL.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else None


@functools.lru_cache(maxsize=1)
def _pass_split_verified() -> bool:
    """One-time self-check (a few ms, tiny images): does the pass split reproduce this Pillow bit for bit?

    Covers both pass orders, up- and downscaling, padding, cropping and passes stopped after the kept
    outputs. On any difference (a Pillow build that resamples differently from what `_pil_pass_order`
    and `_pass_extent` expect) we fall back to plain `Image.resize` calls for the life of the process.
    """
    rng = np.random.default_rng(0)
    cases = [  # (image w, h), (out w, h), pad background or None
        ((61, 23), (29, 11), None), ((23, 61), (11, 29), None), ((9, 67), (4, 30), None),
        ((3, 310), (2, 100), None), ((17, 13), (40, 31), None), ((31, 20), (13, 13), (122, 116, 104)),
        ((20, 31), (13, 13), (122, 116, 104)),
        ((64, 48), (32, 24), None),  # both passes stop after the kept outputs (`_pass_extent`)
    ]
    for (width, height), out_size, background in cases:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        side = max(width, height)
        source = _PaddedSource(image, *((side, side) if background else (width, height)), background)
        expected = np.asarray(source.full().resize(out_size, Image.Resampling.BICUBIC))
        order = _pil_pass_order(source.width, source.height, *out_size)
        rows, cols = (1, out_size[1] - 1), (1, out_size[0] - 1)
        if order == "H":
            got = _horizontal_then_vertical(source, *out_size, rows, cols, Image.Resampling.BICUBIC)
        else:
            got = _vertical_then_horizontal(source.full(), *out_size, rows, cols, Image.Resampling.BICUBIC)
        if not np.array_equal(got, expected[rows[0]:rows[1], cols[0]:cols[1]]):
            logger.warning("Pillow %s resamples differently from what llava_preprocess expects; using plain "
                           "Image.resize (exact, slower)", PIL.__version__)
            return False
    return True


# --- LLaVA-NeXT anyres -----------------------------------------------------------------------------


def parse_grid_pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    """``image_grid_pinpoints`` (list of pairs, or its string form as in some original configs) → int pairs.

    The pair order is NOT interpreted here: original LLaVA reads (width, height), transformers
    (height, width); see `process_anyres_image`.
    """
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"image_grid_pinpoints {value!r} is not a list of pairs") from exc
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [a, b] pairs, got {value!r}")
    pairs = []
    for pair in value:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
            raise ValueError(f"image_grid_pinpoints entry {pair!r} is not a pair of positive ints")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def select_best_resolution(image_size: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Pick the canvas for anyres tiling. All sizes are (width, height).

    Maximises the image pixels kept after an aspect-preserving downscale to fit the candidate (capped at
    the original pixel count), then minimises the unused canvas area. Strict comparisons: the first
    candidate wins a full tie (this is what makes original and transformers differ, D1).
    """
    width, height = image_size
    best = None
    best_effective, best_wasted = 0, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    if best is None:
        raise ValueError(f"no anyres resolution fits image size {image_size} among {list(candidates)}")
    return best


def resize_and_pad_image(image: Image.Image, target_size: tuple[int, int], resample: int) -> Image.Image:
    """Aspect-preserving resize into target (width, height), centred (floor) on a black RGB canvas."""
    width, height = image.size
    target_w, target_h = target_size
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    resized = image.resize((new_w, new_h), resample)
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Row-major ``patch_size`` squares; the image sides must be multiples of ``patch_size``."""
    width, height = image.size
    if width % patch_size or height % patch_size:
        raise ValueError(f"image {width}x{height} does not divide into {patch_size}-pixel tiles")
    return [image.crop((left, top, left + patch_size, top + patch_size))
            for top in range(0, height, patch_size) for left in range(0, width, patch_size)]


def anyres_resolution(image_size: tuple[int, int], grid_pinpoints: Any, *, hf_semantics: bool) -> tuple[int, int]:
    """Best tiling canvas (width, height) for an image of (width, height).

    ``hf_semantics`` False: original LLaVA, pinpoints read as (width, height). True: transformers
    `LlavaNext*`, pinpoints read as (height, width). The two differ only on ties (both sides ≤ the
    tile size for the usual pinpoints, e.g. 300×200 → 336×672 original, 672×336 transformers).
    """
    pairs = parse_grid_pinpoints(grid_pinpoints)
    candidates = [(b, a) for a, b in pairs] if hf_semantics else list(pairs)
    return select_best_resolution(image_size, candidates)


def process_anyres_image(image: Image.Image, cfg: PreprocessConfig, grid_pinpoints: Any, *,
                         hf_semantics: bool) -> torch.Tensor:
    """LLaVA-NeXT anyres: float32 ``[1 + n_tiles, 3, *cfg.expected_size]``, the squashed base image first.

    Steps (llava-formats.md §2.9): best canvas (`anyres_resolution`); aspect-preserving resize and centre
    on a black canvas; row-major tiles of ``cfg.crop_height``; base image = the whole image resized
    (not padded) to a square; every piece then through `preprocess` (square padding never applies).

    Semantics: original LLaVA (``hf_semantics=False``) resizes with PIL's default BICUBIC and squashes
    the base to ``shortest_edge``²; transformers (True) uses ``cfg.resample`` and squashes the base to
    ``(size_height, size_width)`` or ``shortest_edge``². With the usual bicubic configs only the canvas
    choice on ties differs.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    patch_size = cfg.crop_height  # both references tile by crop_size["height"], crop or not
    target_w, target_h = anyres_resolution(image.size, grid_pinpoints, hf_semantics=hf_semantics)
    if target_w % patch_size or target_h % patch_size:
        raise ValueError(f"anyres resolution {target_w}x{target_h} is not a multiple of the tile size {patch_size}")
    if hf_semantics:
        resample = cfg.resample
        base_size = ((cfg.size_width, cfg.size_height) if cfg.shortest_edge is None
                     else (cfg.shortest_edge, cfg.shortest_edge))
    else:
        if cfg.shortest_edge is None:
            raise ValueError("original anyres semantics need a shortest_edge size (the base image is "
                             "resized to shortest_edge x shortest_edge)")
        resample = int(Image.Resampling.BICUBIC)  # `Image.resize` default used by original LLaVA
        base_size = (cfg.shortest_edge, cfg.shortest_edge)

    canvas = resize_and_pad_image(image, (target_w, target_h), resample)
    tiles = divide_to_patches(canvas, patch_size)
    base = image.resize(base_size, resample)
    tile_cfg = dataclasses.replace(cfg, pad_to_square=False)
    return preprocess_batch([base, *tiles], tile_cfg)
