"""LLaVA-OneVision geometry, preprocessing and packing (extensions/llava/llava_onevision.py) against
transformers: the processor's token counts, its PIL pixels, and ``get_image_features``, bit for bit.

The sizes cover: one tile, grids across and down, unpadding of rows and of columns, the anyres_max_9
bilinear downscale (any grid bigger than about 3x3 tiles of map), degenerate thin images, and images far
larger than the largest canvas; each also inside a two-image prompt, where nothing is tiled.
"""

from __future__ import annotations

import json

import pytest
import torch

import tiny_onevision
from llava_onevision import OnevisionGeometry, OnevisionPreprocessor, max_tiles_of, pack_features
from tiny_llava import make_test_image

SIZES = [
    (60, 60),  # exactly one tile: 1x1 grid
    (37, 61),  # small, odd
    (1, 1),
    (120, 50),  # 2x1, rows unpadded
    (50, 120),  # 1x2, columns unpadded
    (200, 90),  # 4x2 grid, rows unpadded, 8x16 map kept
    (90, 200),
    (300, 200),  # 5x4 grid, rows unpadded, 14x20 map downscaled to 10x14
    (300, 300),  # 5x5 grid: downscaled square
    (97, 262),  # 2x5 grid, 20x8 map: ratio 1.05, above 1 but not above 1.1, so kept as it is
    (333, 1000),
    (1000, 333),
    (640, 480),
    (4, 300),  # one column of features left after unpadding
    (300, 4),
    (1920, 1080),
    (2000, 3000),
]


def _image(size, salt=0):
    return make_test_image(*size, seed=size[0] * 7919 + size[1] + salt)


@pytest.fixture(scope="module")
def tiny(tiny_onevision_checkpoints):
    return tiny_onevision_checkpoints


@pytest.fixture(scope="module")
def reference(tiny):
    return tiny_onevision.reference_model(tiny.hub), tiny_onevision.reference_processor(tiny.hub)


@pytest.fixture(scope="module")
def geometry(tiny):
    config = json.loads((tiny.hub / "config.json").read_text())
    return OnevisionGeometry.from_config(config, tile=tiny.tile, patch=tiny_onevision.PATCH, base_tokens=tiny.base_tokens)


def test_max_tiles_parses_only_anyres_max_n():
    assert max_tiles_of("anyres_max_9") == 9
    assert max_tiles_of("anyres_max_16") == 16
    for bad in ("anyres", "anyres_max_", "anyres_max_0", "max_9", "anyres_max_9x", None):
        with pytest.raises(ValueError, match="vision_aspect_ratio"):
            max_tiles_of(bad)


def test_size_cases_cover_what_they_claim(geometry):
    grids = {size: geometry.grid(size) for size in SIZES}
    assert grids[(60, 60)] == (1, 1)
    downscaled = [s for s in SIZES if geometry.downscale_ratio(*geometry.unpadded_map_size(s)) > 1.1]
    kept = [s for s in SIZES if s not in downscaled and grids[s] != (1, 1)]
    assert len(downscaled) >= 5 and len(kept) >= 3
    assert any(1.0 < geometry.downscale_ratio(*geometry.unpadded_map_size(s)) <= 1.1 for s in kept)
    assert any(geometry.unpadded_map_size(s)[0] < grids[s][1] * geometry.side for s in SIZES)  # rows removed
    assert any(geometry.unpadded_map_size(s)[1] < grids[s][0] * geometry.side for s in SIZES)  # columns removed


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_token_counts_match_the_processor(reference, tiny, geometry, size):
    _, processor = reference
    alone = processor(images=[_image(size)], text="a <image> b")["input_ids"][0]
    assert alone.count(tiny.image_token_id) == geometry.tokens(size, images_in_prompt=1)
    two = processor(images=[[_image(size), _image((90, 40))]], text="<image> and <image>")["input_ids"][0]
    assert two.count(tiny.image_token_id) == geometry.tokens(size, 2) + geometry.tokens((90, 40), 2)
    assert geometry.tokens(size, 2) == tiny.base_tokens + 1


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_preprocessing_is_bit_identical(reference, tiny, size):
    # `transformers.AutoImageProcessor` is a placeholder without torchvision; the class itself works.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    _, processor = reference
    ours = OnevisionPreprocessor(tiny.hub)
    auto = AutoImageProcessor.from_pretrained(str(tiny.hub), backend="pil")
    image = _image(size)
    expected = torch.from_numpy(auto([image])["pixel_values"][0])
    got = ours(image, images_in_prompt=1)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(got, torch.as_tensor(processor(images=[image], text="<image>")["pixel_values"][0]))
    other = _image((45, 70), salt=1)
    pair = auto([[other, image]])["pixel_values"]
    assert torch.equal(ours(image, images_in_prompt=2), torch.from_numpy(pair[1]))
    assert torch.equal(ours(other, images_in_prompt=3), torch.from_numpy(pair[0]))


def test_preprocessing_reads_the_transformers5_layout(tiny):
    image = _image((200, 90))
    assert torch.equal(OnevisionPreprocessor(tiny.saved5)(image, images_in_prompt=1),
                       OnevisionPreprocessor(tiny.hub)(image, images_in_prompt=1))


def _reference_features(model, processor, images):
    """``get_image_features`` of one prompt holding ``images``: a list of ``[tokens, H]``."""
    nested = [images] if len(images) > 1 else images
    inputs = processor(images=nested, text=" ".join(["<image>"] * len(images)), return_tensors="pt")
    with torch.no_grad():
        return model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=torch.tensor([len(images)]),
        ).pooler_output


def _reference_projected(model, pixels):
    """Tower (last hidden state before post_layernorm, all rows: "full") + projector of the reference."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        return model.model.multi_modal_projector(hidden)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_packing_matches_get_image_features(reference, tiny, geometry, size):
    model, processor = reference
    image = _image(size)
    expected = _reference_features(model, processor, [image])[0]
    pixels = OnevisionPreprocessor(tiny.hub)(image, images_in_prompt=1)
    packed = pack_features(_reference_projected(model, pixels), size, 1, geometry, model.model.image_newline.detach())
    assert packed.shape == (geometry.tokens(size, 1), model.config.text_config.hidden_size)
    assert torch.equal(packed, expected)


def test_packing_of_images_that_share_a_prompt(reference, tiny, geometry):
    model, processor = reference
    images = [_image((200, 90)), _image((30, 70), salt=2), _image((60, 60), salt=3)]
    expected = _reference_features(model, processor, images)
    preprocessor = OnevisionPreprocessor(tiny.hub)
    for image, reference_rows in zip(images, expected):
        pixels = preprocessor(image, images_in_prompt=len(images))
        packed = pack_features(_reference_projected(model, pixels), image.size, len(images), geometry,
                               model.model.image_newline.detach())
        assert packed.shape[0] == tiny.base_tokens + 1
        assert torch.equal(packed, reference_rows)


def test_packing_rejects_a_wrong_tile_count(reference, geometry):
    model, _ = reference
    features = torch.zeros(3, geometry.base_tokens, model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="expected 9 tile feature maps for a 200x90 image, got 3"):
        pack_features(features, (200, 90), 1, geometry, torch.zeros(features.shape[-1]))


# The README's token counts: llava-onevision-qwen2-*-ov-hf geometry (SigLIP 384 / 14 = 27 per side, 729 per
# tile, the default 6x6 grid of 384 px pinpoints, anyres_max_9), against the processor's own arithmetic.
README_COUNTS = {(384, 384): 1485, (640, 480): 2929, (1024, 768): 4725, (1920, 1080): 7269}


def test_real_geometry_token_counts_match_the_processor():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # no tokenizer or video part needed
    processor.image_processor = LlavaOnevisionImageProcessorPil()
    processor.num_image_tokens, processor.vision_aspect_ratio = 729, "anyres_max_9"
    geometry = OnevisionGeometry.from_config({}, tile=384, patch=14, base_tokens=729)
    assert [list(p) for p in geometry.grid_pinpoints] == LlavaOnevisionConfig().image_grid_pinpoints
    for (width, height), expected in README_COUNTS.items():
        assert processor._get_number_of_features(height, width, 384, 384) == geometry.tokens((width, height), 1) == expected
    for size in [(500, 1500), (3000, 4000), (200, 100), (800, 600)]:
        assert processor._get_number_of_features(size[1], size[0], 384, 384) == geometry.tokens(size, 1)
    assert geometry.tokens((640, 480), images_in_prompt=2) == 730
