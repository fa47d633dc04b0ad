"""Aya Vision tiling, token layout, preprocessing and projector (extensions/llava/llava_aya.py) against
transformers: ``AyaVisionProcessor``'s expansion and ids, its PIL pixels, and ``get_image_features``.

Sizes cover a single tile (no thumbnail), wide and tall grids up to the 12-tile limit, ties between grids
of equal aspect ratio (decided by area), degenerate thin images and images far larger than the tiles.
"""

from __future__ import annotations

import json

import pytest
import torch

import tiny_aya_vision
from llava_aya import AyaConfigError, AyaLayout, AyaPreprocessor, projector_from_tensors
from tiny_llava import make_test_image

SIZES = [
    (84, 84),  # one tile, no thumbnail
    (30, 50),  # small: still one tile
    (1, 1),
    (168, 84),  # 2x1 + thumbnail
    (84, 168),
    (300, 90),  # 3x1
    (400, 300),  # 4:3 -> 4x3 = 12 tiles (the limit)
    (1920, 1080),  # 16:9 -> closest ratio within 12 tiles
    (90, 2000),  # very tall: 1x12
    (2000, 90),
    (500, 500),  # square: ties between 1x1, 2x2, 3x3 decided by area
    (1000, 999),
    (3, 700),
]


def _image(size, salt=0):
    return make_test_image(*size, seed=size[0] * 6007 + size[1] + salt)


@pytest.fixture(scope="module")
def tiny(tiny_aya_checkpoints):
    return tiny_aya_checkpoints


@pytest.fixture(scope="module")
def reference(tiny):
    return tiny_aya_vision.reference_model(tiny.hub), tiny_aya_vision.reference_processor(tiny.hub)


def _layout(folder):
    processor = json.loads((folder / "processor_config.json").read_text())
    image_processor_file = folder / "preprocessor_config.json"
    image_processor = (json.loads(image_processor_file.read_text()) if image_processor_file.is_file()
                       else processor.get("image_processor", {}))
    return AyaLayout.from_processor_configs(processor, image_processor)


def test_layout_reads_both_layouts(tiny):
    hub, saved5 = _layout(tiny.hub), _layout(tiny.saved5)
    assert hub == saved5
    assert hub.tokens_per_tile == tiny.tokens_per_tile == 9 and hub.max_tiles == 12 and hub.tile == 84


def test_layout_refuses_a_tile_size_mismatch():
    with pytest.raises(AyaConfigError, match="img_size 364 differs from the image processor's tile size 384"):
        AyaLayout.from_processor_configs({"img_size": 364, "patch_size": 14, "downsample_factor": 2},
                                         {"size": {"height": 384, "width": 384}})


def test_size_cases_cover_what_they_claim(tiny):
    layout = _layout(tiny.hub)
    tiles = {size: layout.num_tiles(size) for size in SIZES}
    assert tiles[(84, 84)] == 1 and tiles[(168, 84)] == 3
    assert max(tiles.values()) == 13  # 12 tiles + thumbnail
    assert len(set(tiles.values())) >= 5


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_expansion_and_counts_match_the_processor(reference, tiny, size):
    _, processor = reference
    layout = _layout(tiny.hub)
    image = _image(size)
    got = processor(images=[image], text="Look: <image> ok", add_special_tokens=False)["input_ids"][0]
    n = layout.num_tiles(size)
    expected_text = "Look: " + layout.expansion(n) + " ok"
    assert processor.tokenizer(expected_text, add_special_tokens=False)["input_ids"] == got
    assert layout.expansion(n) == processor._prompt_split_image(n)
    assert got.count(tiny.image_token_id) == layout.image_tokens(size) == n * tiny.tokens_per_tile


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_preprocessing_is_bit_identical(reference, tiny, size):
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    _, processor = reference
    image = _image(size)
    ours = AyaPreprocessor(tiny.hub, _layout(tiny.hub))(image)
    assert ours.shape == (_layout(tiny.hub).num_tiles(size), 3, tiny.tile, tiny.tile) and ours.dtype == torch.float32
    auto = AutoImageProcessor.from_pretrained(str(tiny.hub), backend="pil")
    assert type(auto).__name__ == "GotOcr2ImageProcessorPil"
    assert torch.equal(ours, torch.from_numpy(auto([image], crop_to_patches=True, return_tensors="np")["pixel_values"]))
    assert torch.equal(ours, processor(images=[image], text="<image>", return_tensors="pt")["pixel_values"])
    assert torch.equal(ours, AyaPreprocessor(tiny.saved5, _layout(tiny.saved5))(image))


def test_tiling_ignores_the_image_processors_own_crop_setting(reference, tiny):
    """AyaVisionProcessor passes crop_to_patches=True itself, outranking the image processor's false."""
    _, processor = reference
    processor.image_processor.crop_to_patches = False
    try:
        got = processor(images=[_image((300, 90))], text="<image>")["pixel_values"]
    finally:
        processor.image_processor.crop_to_patches = True
    assert len(got) == _layout(tiny.hub).num_tiles((300, 90)) == 4


def _projector(reference_model, tiny):
    config = reference_model.config
    state = {k[len("multi_modal_projector."):]: v for k, v in _hub_tensors(tiny).items()
             if k.startswith("multi_modal_projector.")}
    return projector_from_tensors(state, tower_width=config.vision_config.hidden_size,
                                  downsample=config.downsample_factor, eps=config.adapter_layer_norm_eps,
                                  lm_hidden_size=config.text_config.hidden_size)


def _hub_tensors(tiny):
    from safetensors.torch import load_file

    return load_file(str(tiny.hub / "model.safetensors"))


def test_projector_matches_the_reference(reference, tiny):
    model, _ = reference
    projector = _projector(model, tiny)
    features = torch.randn(5, (tiny.tile // tiny_aya_vision.PATCH) ** 2, model.config.vision_config.hidden_size,
                           generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.model.multi_modal_projector(features)
        got = projector(features)
    assert got.shape == (5, tiny.tokens_per_tile, model.config.text_config.hidden_size)
    assert torch.equal(got, expected.flatten(1, 2))


def test_projector_refuses_mismatched_widths(reference, tiny):
    model, _ = reference
    state = {k[len("multi_modal_projector."):]: v for k, v in _hub_tensors(tiny).items()
             if k.startswith("multi_modal_projector.")}
    with pytest.raises(AyaConfigError, match="tower gives 32 x 3² = 288"):
        projector_from_tensors(state, tower_width=32, downsample=3, eps=1e-6, lm_hidden_size=64)
    with pytest.raises(AyaConfigError, match="does not match the language model's embedding width 48"):
        projector_from_tensors(state, tower_width=32, downsample=2, eps=1e-6, lm_hidden_size=48)


@pytest.mark.parametrize("size", [(300, 90), (84, 84), (400, 300)], ids=["3x1", "1x1", "4x3"])
def test_tower_and_projector_match_get_image_features(reference, tiny, size):
    """The extension's truncated SigLIP tower + the Aya projector = ``get_image_features``, row for row."""
    import llava_vision

    model, processor = reference
    config = json.loads((tiny.hub / "config.json").read_text())
    tower = llava_vision.VisionTower(config["vision_config"], (config["vision_feature_layer"],), keep_cls=True)
    tensors = _hub_tensors(tiny)
    prefix = "vision_tower.vision_model."
    tower.load_weights({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, "aya")
    tower.eval()
    pixels = AyaPreprocessor(tiny.hub, _layout(tiny.hub))(_image(size))
    with torch.no_grad():
        expected = model.model.get_image_features(pixels).pooler_output.flatten(0, 2)
        got = _projector(model, tiny)(tower(pixels)).flatten(0, 1)
    assert got.shape[0] == _layout(tiny.hub).image_tokens(size)
    assert torch.equal(got, expected)


# The README's counts: aya-vision-8b geometry (364 px tiles, 169 rows per tile, up to 12 tiles + thumbnail).
README_TILES = {(384, 384): 1, (640, 480): 13, (1280, 720): 9, (1920, 1080): 9, (500, 1500): 4}


def test_real_geometry_tile_counts_match_the_image_processor():
    from transformers import GotOcr2ImageProcessorPil

    image_processor = GotOcr2ImageProcessorPil(size={"height": 364, "width": 364}, max_patches=12, min_patches=1)
    layout = AyaLayout.from_processor_configs({"img_size": 364, "patch_size": 14, "downsample_factor": 2},
                                              {"size": {"height": 364, "width": 364}, "max_patches": 12})
    assert layout.tokens_per_tile == 169
    for (width, height), tiles in README_TILES.items():
        assert image_processor.get_number_of_image_patches(height, width, {"crop_to_patches": True}) == tiles
        assert layout.num_tiles((width, height)) == tiles and layout.image_tokens((width, height)) == tiles * 169
