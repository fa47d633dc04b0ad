"""Pixtral-tower families: Pixtral in llava-hf form and Mistral 3.

* :class:`PixtralTower`: the Pixtral vision encoder (2-D RoPE over the patch grid, RMS norms, SwiGLU MLPs)
  truncated after the deepest selected layer. Images keep their own size (up to the longest edge), so
  one call takes images of one size: ``pixels [B, 3, H, W] -> features [B, (H / p) * (W / p), C]``, rows
  in raster order. The reference runs several images as one sequence with a block-diagonal mask; one
  batch row per image is the same attention.
* :class:`Mistral3Projector`: Mistral 3's RMS norm, patch merger (``spatial_merge_size``² neighbouring
  patches concatenated, then one Linear) and MLP.
* :class:`PixtralPlan`: preprocessing by transformers' own ``PixtralImageProcessorPil`` (bit-identical by
  construction, no torchvision), one image per tensor, and the processor's token layout: per row of
  ``patch x spatial_merge_size`` pixels, ``[IMG]`` x columns then ``[IMG_BREAK]``, the last row ending
  ``[IMG_END]`` instead; only the ``[IMG]`` positions take feature rows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

import llava_checkpoint
from llava_checkpoint import CheckpointError, LlavaSpec, WeightFiles
from llava_plan import ImagePlan, PlanContext, read_processor_settings
from llava_prompt import SlotLayout, TokenRun
from llava_vision import (
    _layer_count_needed,
    linear_pair_widths,
    load_module_strictly,
    read_hf_projector_tensors,
    TruncatedTower,
)

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "[IMG]"
IMAGE_BREAK_TOKEN = "[IMG_BREAK]"
IMAGE_END_TOKEN = "[IMG_END]"


# ----------------------------------------------------------------------------------------------------------
# Token layout (pure arithmetic)


def pixtral_grid(image_size: tuple[int, int], max_size: tuple[int, int], patch: int) -> tuple[int, int]:
    """``(rows, columns)`` of ``patch``-pixel cells for an image of ``(width, height)``, as
    ``PixtralImageProcessor`` sizes it: scaled down (floor) to fit ``max_size`` = ``(max_height, max_width)``
    when larger, never scaled up, then each side rounded up to whole cells."""
    width, height = image_size
    max_height, max_width = max_size
    ratio = max(height / max_height, width / max_width)
    if ratio > 1:
        height = int(math.floor(height / ratio))
        width = int(math.floor(width / ratio))
    if height < 1 or width < 1:
        raise ValueError(f"a {image_size[0]}x{image_size[1]} image is too thin: scaled to fit "
                         f"{max_width}x{max_height} it is less than one pixel across")
    return (height - 1) // patch + 1, (width - 1) // patch + 1


def pixtral_layout(rows: int, columns: int, image: str = IMAGE_TOKEN, row_break: str = IMAGE_BREAK_TOKEN,
                   end: str = IMAGE_END_TOKEN) -> SlotLayout:
    """``[IMG]`` x columns + ``[IMG_BREAK]`` per row, the last row's break replaced by ``[IMG_END]``."""
    runs = []
    for row in range(rows):
        runs.append(TokenRun(image, columns, image=True))
        runs.append(TokenRun(end if row == rows - 1 else row_break, 1))
    return SlotLayout(tuple(runs))


# ----------------------------------------------------------------------------------------------------------
# Tower


class PixtralTower(TruncatedTower):
    """Pixtral vision encoder truncated after the deepest selected layer (built from transformers'
    Pixtral modules, so the arithmetic is the reference's).

    forward: pixels ``[B, 3, H, W]`` (H, W multiples of the patch size, at most ``image_size``) ->
    features ``[B, (H / patch) * (W / patch), C * len(layers)]``. ``hidden_states`` index k is the output
    of k layers (0: after ``ln_pre``), as in ``PixtralVisionModel``'s ``output_hidden_states``.
    """

    weight_probe = "patch_conv.weight"
    has_cls = False

    def __init__(self, vision_config: dict, layers: tuple[int, ...], keep_cls: bool = True):
        super().__init__()
        from transformers import AutoConfig
        from transformers.models.pixtral.modeling_pixtral import (
            PixtralRMSNorm,
            PixtralRotaryEmbedding,
            PixtralTransformer,
        )

        fields = dict(vision_config)
        fields.pop("model_type", None)
        self.config = AutoConfig.for_model("pixtral", **fields)
        self.config._attn_implementation = "sdpa"
        self.model_type = "pixtral"
        self.keep_cls = True
        depth, self.positions = _layer_count_needed(layers, self.config.num_hidden_layers)
        self.config.num_hidden_layers = depth
        self.patch_conv = nn.Conv2d(self.config.num_channels, self.config.hidden_size,
                                    kernel_size=self.config.patch_size, stride=self.config.patch_size, bias=False)
        self.ln_pre = PixtralRMSNorm(self.config.hidden_size, eps=1e-5)
        self.transformer = PixtralTransformer(self.config)
        self.patch_positional_embedding = PixtralRotaryEmbedding(self.config)

    @property
    def tokens_per_image(self) -> int:
        """Patches of a square image of the largest size (images smaller than that have fewer)."""
        return (self.image_size // self.patch_size) ** 2

    def reset_position_ids(self) -> None:
        """Recompute the RoPE frequency table, a non-persistent buffer that ``to_empty`` leaves
        uninitialised (the tower is built on the meta device)."""
        rotary = self.patch_positional_embedding
        inv_freq, _ = rotary.compute_default_rope_parameters(self.config, device=rotary.inv_freq.device)
        rotary.inv_freq.copy_(inv_freq)
        rotary.original_inv_freq.copy_(inv_freq)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values.to(self.patch_conv.weight.dtype)
        patches = self.patch_conv(pixels)  # [B, C, h, w]
        _, _, rows, columns = patches.shape
        max_side = self.image_size // self.patch_size
        if rows > max_side or columns > max_side:
            raise ValueError(f"pixels of {pixels.shape[-1]}x{pixels.shape[-2]} exceed the tower's "
                             f"{self.image_size} px")
        # [B, C, h, w] -> [B, h * w, C], rows in raster order, contiguous as the reference's flatten(1).T + cat
        # (the RMS norm of a strided view sums in another order: 1e-5 off).
        hidden = self.ln_pre(patches.flatten(2).transpose(1, 2).contiguous())
        grid_rows, grid_columns = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
        position_ids = (grid_rows * max_side + grid_columns).reshape(-1).to(hidden.device)
        position_embeddings = self.patch_positional_embedding(hidden, position_ids)
        captured = {0: hidden} if 0 in self.positions else {}
        for index, layer in enumerate(self.transformer.layers, start=1):
            # No mask: each batch row is one image, so the attention is the reference's block-diagonal one.
            hidden = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
            if index in self.positions:
                captured[index] = hidden
        if len(self.positions) == 1:
            return captured[self.positions[0]]
        return torch.cat([captured[p] for p in self.positions], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Mistral 3 projector


class Mistral3Projector(nn.Module):
    """Mistral 3: ``RMSNorm -> patch merger -> linear_1 -> act -> linear_2`` (``Mistral3MultiModalProjector``,
    whose norm and merger modules it uses). Parameter names are the checkpoint's
    (``multi_modal_projector.norm.weight``, ``patch_merger.merging_layer.weight``, ``linear_1.*``, ...).

    forward: ``[B, h * w, C]`` features of B images of one size, ``grid = (h, w)`` patches ->
    ``[B, (h / m) * (w / m), H_lm]`` with m = ``spatial_merge_size``.
    """

    def __init__(self, config):
        super().__init__()
        from transformers.activations import ACT2FN
        from transformers.models.mistral3.modeling_mistral3 import Mistral3PatchMerger, Mistral3RMSNorm

        self.patch_size = config.vision_config.patch_size
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.norm = Mistral3RMSNorm(config.vision_config.hidden_size, eps=config.text_config.rms_norm_eps)
        self.patch_merger = Mistral3PatchMerger(config)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * layers, config.text_config.hidden_size,
                                  bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size,
                                  bias=config.multimodal_projector_bias)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, length, width = features.shape
        rows = self.norm(features).reshape(batch * length, width)
        # The merger takes the images' pixel sizes and splits the rows per image, as in the reference.
        merged = self.patch_merger(rows, [(grid[0] * self.patch_size, grid[1] * self.patch_size)] * batch)
        projected = self.linear_2(self.act(self.linear_1(merged)))
        return projected.reshape(batch, -1, projected.shape[-1])

    @classmethod
    def load(cls, spec: LlavaSpec, weights: WeightFiles, *, tower: nn.Module, lm_hidden_size: int) -> "Mistral3Projector":
        from transformers import Mistral3Config

        tensors = read_hf_projector_tensors(weights, "patch_merger.merging_layer.weight")
        linear_pair_widths(tensors, tower, lm_hidden_size)  # a check only: Mistral3Config sizes the layers
        config = Mistral3Config.from_dict(dict(spec.hf_config))
        with torch.device("meta"):
            projector = cls(config)
        return load_module_strictly(projector, tensors, spec.projector_type, spec.model_dir)


# ----------------------------------------------------------------------------------------------------------
# Image plan


class PixtralPlan(ImagePlan):
    """Variable-size images for the Pixtral tower; see the module docstring."""

    fixed_pixels = False
    fixed_tokens = False

    def __init__(self, spec: LlavaSpec, image_processor, cell: int, max_size: tuple[int, int],
                 tokens: tuple[str, str, str]):
        super().__init__(spec)
        self.image_processor = image_processor
        self.cell = cell  # pixels per image token along each side: patch_size x spatial_merge_size
        self.max_size = max_size  # (max_height, max_width)
        self.tokens = tokens  # image, row break, end

    @classmethod
    def from_checkpoint(cls, context: PlanContext) -> "PixtralPlan":
        from transformers import PixtralImageProcessorPil

        spec, tower = context.spec, context.tower
        settings = read_processor_settings(spec.model_dir)
        if not settings:
            raise CheckpointError(f"{spec.model_dir} has no preprocessor_config.json (the Pixtral image "
                                  "processor settings); it is incomplete")
        processor_path = Path(spec.model_dir) / "processor_config.json"
        processor = llava_checkpoint._read_json(processor_path) if processor_path.is_file() else {}
        # The processor's cell must be the model's (patch x spatial_merge_size), or the [IMG] count would not
        # match the features; a processor_config.json that does not say takes the model's values.
        model_merge = int(spec.hf_config.get("spatial_merge_size", 1))
        patch = int(processor.get("patch_size", tower.patch_size))
        merge = int(processor.get("spatial_merge_size", model_merge))
        if patch != tower.patch_size or merge != model_merge:
            raise CheckpointError(
                f"processor_config.json says patch_size {patch} and spatial_merge_size {merge}, the model "
                f"{tower.patch_size} and {model_merge}; image tokens would not match the features")
        image_processor = PixtralImageProcessorPil.from_dict(
            {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")})
        size = image_processor.size
        max_size = (size.longest_edge, size.longest_edge) if size.longest_edge else (size.height, size.width)
        if max_size[0] is None or max_size[1] is None:
            raise CheckpointError(f"the Pixtral image processor of {spec.model_dir} has no longest_edge size")
        if max(max_size) > tower.image_size:
            raise CheckpointError(f"images are resized up to {max(max_size)} px but the vision tower takes at most "
                                  f"{tower.image_size} px (vision_config.image_size)")
        tokens = (processor.get("image_token", IMAGE_TOKEN), processor.get("image_break_token", IMAGE_BREAK_TOKEN),
                  processor.get("image_end_token", IMAGE_END_TOKEN))
        return cls(spec, image_processor, patch * merge, max_size, tokens)

    def preprocess(self, images):
        # One image per call: the processor pads a batch to its largest image, which the tower must not see.
        return [self.image_processor(image, patch_size=self.cell, return_tensors="pt")["pixel_values"]
                for image in images]

    def pack(self, projected, image_size):
        return projected.reshape(-1, projected.shape[-1])

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, columns)`` of image tokens for an image of ``(width, height)``."""
        return pixtral_grid(image_size, self.max_size, self.cell)

    def layout(self, image_size):
        rows, columns = self.grid(image_size)
        return pixtral_layout(rows, columns, *self.tokens)

    @property
    def nominal_size(self):
        return self.max_size[1], self.max_size[0]

    def describe(self) -> str:
        return (f"images at their own size up to {max(self.max_size)} px, one token per {self.cell}x{self.cell} px "
                f"(up to {self.layout(self.nominal_size).positions} tokens per image)")
