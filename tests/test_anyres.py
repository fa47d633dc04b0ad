"""LLaVA-NeXT anyres arithmetic and packing (llava_next.py) against both references, without a model.

* Token counts at the real 336/14 geometry: the llava-formats.md §2.9 table (original vs transformers),
  transformers' ``LlavaNextProcessor`` count over a sweep of sizes, and the original algorithm's count.
* ``pack_features`` equals transformers' ``LlavaNextModel.pack_image_features`` (HF semantics) and the
  independent original packing in ``tiny_llava_next`` (original semantics), exactly, on random features.
* The loaded pipelines agree with their geometry: ``image_tokens(size)`` rows come out of ``encode_images``.
"""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace

import pytest
import torch

from llava_next import AnyresGeometry, pack_features
from llava_pipeline import LlavaPipeline, VisionSettings
from llava_prompt import split_on_marker
from tiny_llava import make_test_image
from tiny_llava_next import REAL_PINPOINTS, original_best_resolution, original_pack

TILE, PATCH = 336, 14
SIDE = TILE // PATCH
BASE = SIDE * SIDE

# llava-formats.md §2.9: image W×H -> (original tokens, transformers 5.6.2 tokens).
DOC_TABLE = {
    (1024, 899): (2634, 2634),
    (640, 480): (2340, 2340),
    (500, 334): (1464, 1464),
    (333, 1000): (2376, 2376),
    (1920, 1080): (1948, 1948),
    (704, 396): (1850, 1948),  # D2: int() vs int(round(x, 7))
    (300, 200): (976, 1464),  # D1: canvas tie, (w, h) vs (h, w) pinpoints
}
D2_DOC_SIZES = [(704, 396), (752, 423), (1408, 792), (1504, 846), (2352, 1323)]  # §5.5


def real_geometry(hf_semantics: bool) -> AnyresGeometry:
    return AnyresGeometry(grid_pinpoints=REAL_PINPOINTS, tile=TILE, side=SIDE, base_tokens=BASE, hf_semantics=hf_semantics)


def sweep_sizes(count: int = 400, seed: int = 3) -> list[tuple[int, int]]:
    """Seeded sizes: small (ties), ordinary photos, and extreme aspect ratios, plus the documented ones."""
    rng = random.Random(seed)
    sizes = list(DOC_TABLE) + D2_DOC_SIZES + [(1, 1), (1, 1000), (1000, 1), (2, 2000), (336, 336), (337, 336)]
    for _ in range(count):
        kind = rng.random()
        if kind < 0.25:
            sizes.append((rng.randint(1, 336), rng.randint(1, 336)))
        elif kind < 0.8:
            sizes.append((rng.randint(100, 2600), rng.randint(100, 2600)))
        else:
            long_side, short_side = rng.randint(300, 3000), rng.randint(1, 60)
            sizes.append((long_side, short_side) if rng.random() < 0.5 else (short_side, long_side))
    return sizes


def transformers_processor_count(size: tuple[int, int]) -> int:
    """`LlavaNextProcessor`'s own count ("default" strategy, num_additional_image_tokens=1)."""
    from transformers import LlavaNextProcessor

    fake = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=REAL_PINPOINTS), patch_size=PATCH,
                           num_additional_image_tokens=1)
    fake._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, fake)
    width, height = size
    return LlavaNextProcessor._get_number_of_features(fake, height, width, TILE, TILE) - 1


def transformers_pack(features, size, newline):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=TILE, patch_size=PATCH),
                             image_grid_pinpoints=REAL_PINPOINTS)
    packed, _ = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), [features], [[size[1], size[0]]], "default", image_newline=newline)
    return packed[0]


# ---------------------------------------------------------------------------------------------------------
# Token counts


@pytest.mark.parametrize("size", list(DOC_TABLE), ids=[f"{w}x{h}" for w, h in DOC_TABLE])
def test_token_counts_of_the_documented_table(size):
    original, hf = DOC_TABLE[size]
    assert real_geometry(hf_semantics=False).tokens(size) == original
    assert real_geometry(hf_semantics=True).tokens(size) == hf


def test_documented_d2_sizes_lose_two_rows_in_the_original():
    for size in D2_DOC_SIZES:
        original = real_geometry(False).feature_map_size(size)
        hf = real_geometry(True).feature_map_size(size)
        assert (original[0], hf[0]) == (26, 28), size


def test_hf_token_counts_equal_llava_next_processor_over_a_sweep():
    geometry = real_geometry(hf_semantics=True)
    mismatches = [(size, geometry.tokens(size), transformers_processor_count(size))
                  for size in sweep_sizes() if geometry.tokens(size) != transformers_processor_count(size)]
    assert not mismatches, mismatches[:5]


def test_original_grid_and_counts_follow_the_original_over_a_sweep():
    geometry = real_geometry(hf_semantics=False)
    newline = torch.zeros(1)
    for size in sweep_sizes(count=150):
        best_w, best_h = original_best_resolution(size, REAL_PINPOINTS)
        assert geometry.grid(size) == (best_w // TILE, best_h // TILE), size
        tiles = geometry.num_tiles(size)
        packed = original_pack(torch.zeros(1 + tiles, BASE, 1), size, REAL_PINPOINTS, TILE, SIDE, newline)
        assert geometry.tokens(size) == packed.shape[0], size


def test_semantics_differ_only_on_ties_and_rounding():
    """Every divergence in the sweep is a D1 canvas tie (original grid != HF grid) or D2 rounding."""
    original, hf = real_geometry(False), real_geometry(True)
    seen = set()
    for size in sweep_sizes():
        if original.tokens(size) == hf.tokens(size) and original.grid(size) == hf.grid(size):
            continue
        if original.grid(size) != hf.grid(size):
            seen.add("D1")
            # Ties: both sides fit one tile, or the image is so thin that nothing survives the downscale.
            assert max(size) <= TILE or min(size) * TILE < max(size), size
        else:
            seen.add("D2")
            rows_o, cols_o = original.feature_map_size(size)
            rows_h, cols_h = hf.feature_map_size(size)
            assert rows_h - rows_o == 2 or cols_h - cols_o == 2, size
    assert seen == {"D1", "D2"}


# ---------------------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("seed", range(3))
def test_pack_features_equals_transformers_pack_image_features(seed):
    generator = torch.Generator().manual_seed(seed)
    geometry = real_geometry(hf_semantics=True)
    newline = torch.randn(3, generator=generator)
    for size in sweep_sizes(count=40, seed=seed) + D2_DOC_SIZES:
        features = torch.randn(1 + geometry.num_tiles(size), BASE, 3, generator=generator)
        got = pack_features(features, size, geometry, newline)
        assert torch.equal(got, transformers_pack(features, size, newline)), size
        assert got.shape[0] == geometry.tokens(size)


@pytest.mark.parametrize("seed", range(3))
def test_pack_features_equals_the_original_packing(seed):
    generator = torch.Generator().manual_seed(seed)
    geometry = real_geometry(hf_semantics=False)
    newline = torch.randn(3, generator=generator)
    for size in sweep_sizes(count=40, seed=seed) + D2_DOC_SIZES + [(300, 200), (16, 16)]:
        features = torch.randn(1 + geometry.num_tiles(size), BASE, 3, generator=generator)
        got = pack_features(features, size, geometry, newline)
        assert torch.equal(got, original_pack(features, size, REAL_PINPOINTS, TILE, SIDE, newline)), size


def test_spatial_without_unpad_is_the_original_raster_order():
    """Original ``mm_patch_merge_type: spatial``: tiles in raster order, no unpad, no newline
    (`permute(0, 2, 1, 3, 4).flatten(0, 3)` in llava_arch.py), base first."""
    geometry = AnyresGeometry(grid_pinpoints=REAL_PINPOINTS, tile=TILE, side=SIDE, base_tokens=BASE,
                              hf_semantics=False, unpad=False, newline=False)
    generator = torch.Generator().manual_seed(5)
    for size in [(1024, 899), (500, 334), (333, 1000), (300, 200)]:
        across, down = geometry.grid(size)
        features = torch.randn(1 + across * down, BASE, 2, generator=generator)
        tiles = features[1:].view(down, across, SIDE, SIDE, 2).permute(0, 2, 1, 3, 4).flatten(0, 3)
        expected = torch.cat((features[0], tiles))
        assert torch.equal(pack_features(features, size, geometry, None), expected)
        assert geometry.tokens(size) == expected.shape[0]


def test_pack_features_rejects_a_wrong_tile_count():
    geometry = real_geometry(hf_semantics=True)
    with pytest.raises(ValueError, match="tiles"):
        pack_features(torch.zeros(3, BASE, 2), (1024, 899), geometry, torch.zeros(2))


# ---------------------------------------------------------------------------------------------------------
# The loaded pipelines


@pytest.fixture(scope="module")
def pipelines(tiny_next_checkpoints):
    settings = VisionSettings(clip_device="cpu", projector_device="cpu")
    return {name: LlavaPipeline.load(getattr(tiny_next_checkpoints, name), settings, lm_hidden_size=64)
            for name in ("next_hf", "next_orig")}


def test_specs_of_the_next_formats(tiny_next_checkpoints, pipelines):
    hf, orig = pipelines["next_hf"].spec, pipelines["next_orig"].spec
    pins = tuple(tuple(p) for p in tiny_next_checkpoints.grid_pinpoints)
    assert (hf.format, hf.anyres, hf.patch_merge_type, hf.grid_pinpoints) == ("hf", True, "spatial_unpad", pins)
    assert (orig.format, orig.anyres, orig.patch_merge_type, orig.grid_pinpoints) == ("v1", True, "spatial_unpad", pins)
    assert orig.vision_in_checkpoint and not orig.keep_cls and orig.vision_feature_layers == (-2,)
    assert pipelines["next_hf"].geometry.hf_semantics and not pipelines["next_orig"].geometry.hf_semantics
    assert pipelines["next_hf"].image_newline.shape == (64,)


@pytest.mark.parametrize("name", ["next_hf", "next_orig"])
def test_image_tokens_match_encoded_rows_and_prompt_spans(name, pipelines):
    from transformers import AutoTokenizer

    pipeline = pipelines[name]
    tokenizer = AutoTokenizer.from_pretrained(str(pipeline.spec.model_dir))
    sizes = [(70, 45), (50, 33), (33, 50), (47, 188), (188, 47), (300, 4), (4, 300), (1, 1), (130, 120)]
    images = [make_test_image(w, h, seed=w + h) for w, h in sizes]
    encoded = pipeline.encode_images(images)
    prompt = pipeline.tokenize(split_on_marker("<image>" * len(images), len(images)), tokenizer, add_bos=True,
                               image_sizes=[image.size for image in images])
    for size, rows, span in zip(sizes, encoded, prompt.image_spans):
        assert rows.shape[0] == pipeline.image_tokens(size) == span.length, size
    assert len(prompt.ids) == 1 + sum(pipeline.image_tokens(size) for size in sizes)


def test_next_counts_need_the_image_size(pipelines):
    from transformers import AutoTokenizer

    pipeline = pipelines["next_hf"]
    tokenizer = AutoTokenizer.from_pretrained(str(pipeline.spec.model_dir))
    with pytest.raises(ValueError, match="image size"):
        pipeline.tokenize(split_on_marker("<image>", 1), tokenizer, add_bos=True)
    with pytest.raises(ValueError, match="image size"):
        pipeline.image_tokens(None)
