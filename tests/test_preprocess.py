"""Parity of llava_preprocess with transformers' PIL image processors (torch.equal), config parsing, anyres."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaNextImageProcessorPil

import llava_image_io
import llava_preprocess
from llava_preprocess import PreprocessConfig, preprocess, preprocess_batch, process_anyres_image

# 640×480 … 1×20: the brief's odd sizes; 1024×768 / 768×1024 / 1000×333 hit the pad-row, row-restricted
# and (Pillow 13, for tall images shrinking) vertical-first resize paths; 57×56 / 55×56 pad by one pixel.
SIZES = [(640, 480), (500, 334), (333, 1000), (90, 37), (1, 20), (20, 1), (336, 336), (56, 56),
         (1024, 768), (768, 1024), (1000, 333), (57, 56), (55, 56), (1, 1)]
EDGES = [336, 56]  # CLIP-L/336 and a tiny size


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed + 7919 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_image(width, height):
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                (x + y) * 255 // max(width + height - 2, 1)]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


@pytest.fixture(scope="module")
def reference_processors():
    """(edge, pad) → transformers PIL processor with that CLIP geometry."""
    processors = {}
    for edge in EDGES:
        geometry = dict(size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge})
        processors[edge, True] = LlavaImageProcessorPil(do_pad=True, **geometry)
        processors[edge, False] = CLIPImageProcessorPil(**geometry)
    return processors


def reference(processor, image):
    return processor(image, return_tensors="pt")["pixel_values"][0]


def clip_config(edge, pad):
    return PreprocessConfig(shortest_edge=edge, crop_height=edge, crop_width=edge, pad_to_square=pad)


# --- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("pad", [True, False], ids=["pad", "crop"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("make_image", [noise_image, smooth_image], ids=["noise", "smooth"])
def test_bit_identical_to_reference(reference_processors, edge, pad, size, make_image):
    image = make_image(*size)
    expected = reference(reference_processors[edge, pad], image)
    got = preprocess(image, clip_config(edge, pad))
    assert got.dtype == torch.float32 and got.shape == (3, edge, edge)
    assert torch.equal(got, expected)


# Tall and wide shapes whose padded square is large (up to 4383² = 19 M pixels) but far below the bound
# (llava_preprocess.PAD_MAX_SIDE): the pad path must stay the reference's, bit for bit.
LARGE_PAD_SIZES = [(1386, 4158), (1461, 4383), (1, 5000), (5000, 1), (4158, 1386), (2, 4097)]


@pytest.mark.parametrize("size", LARGE_PAD_SIZES, ids=[f"{w}x{h}" for w, h in LARGE_PAD_SIZES])
def test_large_elongated_images_pad_exactly(reference_processors, size):
    image = noise_image(*size)
    assert torch.equal(preprocess(image, clip_config(336, True)), reference(reference_processors[336, True], image))


@pytest.mark.parametrize("size", [(200, 600), (600, 200), (1, 600)], ids=["tall", "wide", "line"])
def test_pad_deviates_only_beyond_the_documented_bound(monkeypatch, reference_processors, size):
    """Up to a square of PAD_MAX_SIDE² the result is the reference's; one pixel more and the image is shrunk
    to that side first (the bound is lowered here so that the reference stays cheap to run)."""
    processor = reference_processors[56, True]
    monkeypatch.setattr(llava_preprocess, "PAD_MAX_SIDE", max(size))
    image = noise_image(*size)
    assert torch.equal(preprocess(image, clip_config(56, True)), reference(processor, image))
    monkeypatch.setattr(llava_preprocess, "PAD_MAX_SIDE", max(size) - 1)
    assert llava_preprocess._shrink_for_padding(image).size != image.size
    shrunk = llava_preprocess._shrink_for_padding(image)
    assert max(shrunk.size) == max(size) - 1
    # Beyond the bound the result is the reference's on the shrunk image.
    assert torch.equal(preprocess(image, clip_config(56, True)), reference(processor, shrunk))


def _mode_images(width=45, height=31):
    """One generated image per PIL mode the brief names, with content that exercises the mode."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[:5, :, 3] = 0  # fully transparent rows keep their stored RGB in the reference
    gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    palette_image = Image.fromarray(rgba[:, :, :3]).quantize(colors=16)
    transparent_palette = palette_image.copy()
    transparent_palette.info["transparency"] = 3
    return {
        "RGBA": Image.fromarray(rgba),
        "LA": Image.fromarray(np.stack([gray, rgba[:, :, 3]], axis=-1), mode="LA"),
        "P": palette_image,
        "P+transparency": transparent_palette,
        "L": Image.fromarray(gray),
        "1": Image.fromarray(gray > 127),
        "CMYK": Image.fromarray(rgba).convert("CMYK"),
        "YCbCr": Image.fromarray(rgba[:, :, :3]).convert("YCbCr"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
@pytest.mark.parametrize("pad", [True, False], ids=["pad", "crop"])
def test_modes_match_reference_given_the_raw_image(reference_processors, mode, pad):
    raw = _mode_images()[mode]
    # The reference converts the raw image itself (convert_to_rgb); we load, then preprocess.
    expected = reference(reference_processors[56, pad], raw)
    loaded = llava_image_io.load_image(raw, name="test image")
    assert torch.equal(preprocess(loaded, clip_config(56, pad)), expected)
    assert torch.equal(preprocess(raw, clip_config(56, pad)), expected)  # preprocess converts too


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_bit_modes_match_reference_given_our_8bit_conversion(reference_processors, mode):
    ramp = np.linspace(0, 65535, 37 * 23).reshape(23, 37)
    if mode == "F":
        raw = Image.fromarray((ramp / 65535).astype(np.float32))
    elif mode == "I":
        raw = Image.fromarray(ramp.astype(np.int32))
    elif mode == "I;16B":  # big-endian 16-bit (convert("I;16B") would clip to 255 first)
        raw = Image.frombytes("I;16B", (37, 23), ramp.astype(">u2").tobytes())
    else:
        raw = Image.fromarray(ramp.astype(np.uint16))
    assert raw.mode == mode
    loaded = llava_image_io.load_image(raw, name="deep image")
    assert np.asarray(loaded).min() == 0 and np.asarray(loaded).max() == 255  # not the reference's garbage
    for pad in (True, False):
        assert torch.equal(preprocess(loaded, clip_config(56, pad)), reference(reference_processors[56, pad], loaded))


@pytest.mark.parametrize("resample", [Image.Resampling.NEAREST, Image.Resampling.BILINEAR,
                                      Image.Resampling.BOX, Image.Resampling.HAMMING, Image.Resampling.LANCZOS])
def test_other_resample_filters(resample):
    config = PreprocessConfig(shortest_edge=40, crop_height=40, crop_width=40, resample=int(resample))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40},
                                      resample=resample)
    for size in [(97, 61), (61, 97), (30, 200)]:
        image = noise_image(*size)
        assert torch.equal(preprocess(image, config), reference(processor, image)), size


def test_exact_size_and_crop_larger_than_resize():
    # Exact (height, width) resize, then a crop bigger than the resized image on one axis: the
    # reference zero-pads around it before normalising.
    config = PreprocessConfig(shortest_edge=None, size_height=30, size_width=50, crop_height=40, crop_width=44)
    processor = CLIPImageProcessorPil(size={"height": 30, "width": 50}, crop_size={"height": 40, "width": 44})
    # shortest_edge smaller than the crop: both axes padded for a square input, one for others.
    small = PreprocessConfig(shortest_edge=24, crop_height=33, crop_width=31)
    small_processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 33, "width": 31})
    for size in [(70, 45), (45, 70), (33, 33)]:
        image = noise_image(*size)
        assert torch.equal(preprocess(image, config), reference(processor, image))
        assert torch.equal(preprocess(image, small), reference(small_processor, image))


def test_no_center_crop_with_padding():
    config = PreprocessConfig(shortest_edge=48, do_center_crop=False, pad_to_square=True)
    processor = LlavaImageProcessorPil(do_pad=True, do_center_crop=False, size={"shortest_edge": 48})
    for size in [(80, 50), (50, 80)]:
        image = smooth_image(*size)
        got = preprocess(image, config)
        assert got.shape == (3, 48, 48) == (3, *config.expected_size)
        assert torch.equal(got, reference(processor, image))


def test_non_default_mean_std_and_rescale():
    config = PreprocessConfig(shortest_edge=32, crop_height=32, crop_width=32, image_mean=(0.5, 0.5, 0.5),
                              image_std=(0.5, 0.25, 0.125), rescale_factor=1 / 256, pad_to_square=True)
    processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 32}, crop_size=32,
                                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.25, 0.125],
                                       rescale_factor=1 / 256)
    image = noise_image(50, 41)
    assert torch.equal(preprocess(image, config), reference(processor, image))


def test_pad_background_is_the_reference_mean_colour():
    # A 1-pixel-high image padded to a 40×40 square: almost everything is background.
    image = Image.new("RGB", (40, 1), (0, 0, 0))
    got = preprocess(image, PreprocessConfig(shortest_edge=40, crop_height=40, crop_width=40, pad_to_square=True))
    mean = torch.tensor(llava_preprocess.OPENAI_CLIP_MEAN).view(3, 1)
    std = torch.tensor(llava_preprocess.OPENAI_CLIP_STD).view(3, 1)
    background = torch.tensor([122, 116, 104], dtype=torch.float32).view(3, 1) / 255
    assert torch.allclose(got[:, 0, :], (background - mean) / std, atol=1e-6)


def test_parallel_split_is_exact(monkeypatch, reference_processors):
    # Force many threads and tiny chunks so the row/column split is exercised on small images too.
    monkeypatch.setattr(llava_preprocess, "worker_threads", lambda: 3)
    monkeypatch.setattr(llava_preprocess, "_MIN_PIXELS_PER_THREAD", 1)
    for size in [(640, 480), (333, 1000), (1000, 333), (90, 37), (57, 56)]:
        image = noise_image(*size, seed=5)
        for pad in (True, False):
            assert torch.equal(preprocess(image, clip_config(56, pad)),
                               reference(reference_processors[56, pad], image)), (size, pad)


def test_pass_extent_geometry():
    # 1024×768 at 336 px: the crop keeps columns 56..392 of 448; the pass may stop after 392 at 896.0.
    assert llava_preprocess._pass_extent(1024, 448, 392) == (392, 896.0)
    assert llava_preprocess._pass_extent(6000, 504, 420) == (420, 5000.0)  # 3:2
    assert llava_preprocess._pass_extent(1920, 597, 466) == (597, 1920.0)  # 16:9: 466 * 1920 / 597 is no float32
    assert llava_preprocess._pass_extent(1000, 504, 420) == (504, 1000.0)  # 1000 * 5 / 6
    assert llava_preprocess._pass_extent(1024, 448, 448) == (448, 1024.0)  # nothing to skip
    assert llava_preprocess._pass_extent((1 << 25) + 1, 2, 1) == (2, (1 << 25) + 1)  # half of it needs 25 bits


_CONVOLUTION_FILTERS = [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS,
                        Image.Resampling.BOX, Image.Resampling.HAMMING]


def test_pass_extent_is_bit_identical_to_the_full_pass():
    # The claim behind `_pass_extent`, checked against PIL itself on geometries where it applies: the
    # first `count` outputs of resampling the box [0, end) equal those of the whole pass, in either
    # direction and with every convolution filter (up- and downscaling).
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(1500):
        out_size = int(rng.integers(2, 200))
        in_size = int(out_size * rng.choice([2, 16 / 7, 7 / 4, 3 / 2, 5 / 8, 4 / 3, 9 / 16, 1.25]) + rng.integers(0, 3))
        count = int(rng.integers(1, out_size))
        in_size = max(in_size, 1)
        outputs, end = llava_preprocess._pass_extent(in_size, out_size, count)
        if outputs == out_size:
            continue
        assert outputs == count
        image = noise_image(in_size, 7, seed=checked)
        resample = _CONVOLUTION_FILTERS[checked % len(_CONVOLUTION_FILTERS)]
        full = np.asarray(image.resize((out_size, 7), resample))[:, :count]
        prefix = np.asarray(image.resize((count, 7), resample, box=(0, 0, end, 7)))
        assert np.array_equal(prefix, full), (in_size, out_size, count, end, resample)
        tall = image.transpose(Image.Transpose.TRANSPOSE)  # the same for the vertical pass
        full = np.asarray(tall.resize((7, out_size), resample))[:count]
        prefix = np.asarray(tall.resize((7, count), resample, box=(0, 0, 7, end)))
        assert np.array_equal(prefix, full), ("vertical", in_size, out_size, count, end, resample)
        checked += 1
    assert checked >= 200


def test_photo_shapes_stop_the_pass_after_the_crop(monkeypatch, reference_processors):
    # 4:3 landscape and portrait photos at 336 px skip the resize outputs after the crop, and stay exact.
    boxes = []
    resize = Image.Image.resize

    def spy(image, size, resample=None, box=None, reducing_gap=None):
        boxes.append(box)
        return resize(image, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", spy)
    for size in [(1024, 768), (768, 1024)]:
        boxes.clear()
        image = smooth_image(*size)
        assert torch.equal(preprocess(image, clip_config(336, False)), reference(reference_processors[336, False], image))
        assert any(box is not None and 896.0 in box for box in boxes), (size, boxes)


def test_self_check_catches_a_wrong_prefix(monkeypatch, caplog):
    monkeypatch.setattr(llava_preprocess, "_pass_extent",
                        lambda in_size, out_size, needed: (needed, needed * in_size / out_size + 0.5))
    llava_preprocess._pass_split_verified.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="llava_preprocess"):
            assert not llava_preprocess._pass_split_verified()
    finally:
        llava_preprocess._pass_split_verified.cache_clear()


@pytest.mark.parametrize("threads", [1, 3])
def test_resize_window_matches_one_pil_resize_call(monkeypatch, threads):
    # The core claim, on random geometry: the split (either pass order, padding shortcuts, windows)
    # equals slicing one plain `Image.resize` of the padded image.
    monkeypatch.setattr(llava_preprocess, "worker_threads", lambda: threads)
    monkeypatch.setattr(llava_preprocess, "_MIN_PIXELS_PER_THREAD", 1)
    rng = np.random.default_rng(threads)
    orders = set()
    for _ in range(60):
        width, height = (int(v) for v in rng.integers(1, 120, 2))
        out_w, out_h = (int(v) for v in rng.integers(1, 90, 2))
        background = (122, 116, 104) if rng.random() < 0.5 and width != height else None
        side = max(width, height)
        source = llava_preprocess._PaddedSource(noise_image(width, height, seed=int(rng.integers(1 << 30))),
                                                *((side, side) if background else (width, height)), background)
        row0 = int(rng.integers(0, out_h))
        col0 = int(rng.integers(0, out_w))
        rows, cols = (row0, int(rng.integers(row0 + 1, out_h + 1))), (col0, int(rng.integers(col0 + 1, out_w + 1)))
        resample = int(rng.choice([Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS]))
        expected = np.asarray(source.full().resize((out_w, out_h), resample))[rows[0]:rows[1], cols[0]:cols[1]]
        got = llava_preprocess._resize_window(source, (out_w, out_h), rows, cols, resample)
        assert np.array_equal(got, expected), (width, height, out_w, out_h, background, rows, cols, resample)
        orders.add(llava_preprocess._pil_pass_order(source.width, source.height, out_w, out_h))
    # Both orders exercised where this Pillow picks either (13.0: vertical first for tall shrinks).
    assert "H" in orders and ("V" in orders or llava_preprocess._pillow_version() != (13, 0))


def test_plain_resize_fallback_is_exact(monkeypatch, reference_processors):
    monkeypatch.setattr(llava_preprocess, "_pil_pass_order", lambda *sizes: None)
    for pad in (True, False):
        image = noise_image(500, 334)
        assert torch.equal(preprocess(image, clip_config(56, pad)), reference(reference_processors[56, pad], image))


def test_pass_split_is_active_on_this_pillow():
    # If this fails after a Pillow upgrade, read its ImagingResampleInner and extend _pil_pass_order:
    # results stay exact (plain Image.resize fallback) but preprocessing gets slower.
    assert llava_preprocess._pil_pass_order(10, 10, 5, 5) is not None, f"Pillow {Image.__version__} unknown"
    assert llava_preprocess._pass_split_verified()


def test_self_check_catches_a_wrong_pass_order(monkeypatch, caplog):
    if (llava_preprocess._pillow_version() or (0, 0)) < (13, 0):
        pytest.skip("before Pillow 13 only extreme shapes resize vertically first")
    monkeypatch.setattr(llava_preprocess, "_pil_pass_order", lambda *sizes: "H")  # wrong for tall shrinks
    llava_preprocess._pass_split_verified.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="llava_preprocess"):
            assert not llava_preprocess._pass_split_verified()
        assert "resamples differently" in caplog.text
    finally:
        llava_preprocess._pass_split_verified.cache_clear()


def test_pass_order_rule_matches_pillow():
    # Where the rule says "V", resizing the two passes in H-then-V order must differ from PIL's
    # one-call resize for some content, and V-then-H must match it (and vice versa).
    rng = np.random.default_rng(11)
    for (in_w, in_h), (out_w, out_h) in [((60, 400), (20, 150)), ((400, 60), (150, 20)), ((50, 90), (45, 20))]:
        image = Image.fromarray(rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8))
        full = np.asarray(image.resize((out_w, out_h), Image.Resampling.BICUBIC))
        h_first = np.asarray(image.resize((out_w, in_h), Image.Resampling.BICUBIC)
                             .resize((out_w, out_h), Image.Resampling.BICUBIC))
        v_first = np.asarray(image.resize((in_w, out_h), Image.Resampling.BICUBIC)
                             .resize((out_w, out_h), Image.Resampling.BICUBIC))
        order = llava_preprocess._pil_pass_order(in_w, in_h, out_w, out_h)
        assert np.array_equal(full, h_first if order == "H" else v_first)
        assert not np.array_equal(h_first, v_first)


def test_batch():
    config = clip_config(56, True)
    images = [noise_image(90, 37), smooth_image(20, 60), noise_image(56, 56)]
    batch = preprocess_batch(images, config)
    assert batch.shape == (3, 3, 56, 56) and batch.dtype == torch.float32
    for row, image in zip(batch, images):
        assert torch.equal(row, preprocess(image, config))
    assert preprocess_batch([], config).shape == (0, 3, 56, 56)


# --- config ----------------------------------------------------------------------------------------


def test_from_processor_dict_openai_clip_336_style():
    # openai/clip-vit-large-patch14-336 preprocessor_config.json (old int form)
    config = PreprocessConfig.from_processor_dict({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
    }, pad_to_square=True)
    assert config == PreprocessConfig(shortest_edge=336, crop_height=336, crop_width=336, pad_to_square=True)
    assert config.expected_size == (336, 336)


def test_from_processor_dict_llava_hf_style():
    config = PreprocessConfig.from_processor_dict({
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "CLIPImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "LlavaProcessor", "resample": 2, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336}, "do_pad": True,
        "image_grid_pinpoints": [[336, 672], [672, 336]],
        # runtime options that recent transformers versions save as null
        "device": None, "return_tensors": None, "input_data_format": None, "crop_pct": None,
    }, pad_to_square=False)
    assert (config.shortest_edge, config.crop_height, config.resample) == (336, 336, 2)
    assert config.image_mean == (0.5, 0.5, 0.5) and not config.pad_to_square


def test_from_processor_dict_defaults_are_clip_image_processor_defaults():
    config = PreprocessConfig.from_processor_dict({}, pad_to_square=False)
    clip = CLIPImageProcessorPil()
    assert config.shortest_edge == clip.size["shortest_edge"]
    assert (config.crop_height, config.crop_width) == (clip.crop_size["height"], clip.crop_size["width"])
    assert config.resample == clip.resample and config.rescale_factor == clip.rescale_factor
    assert config.image_mean == tuple(clip.image_mean) and config.image_std == tuple(clip.image_std)
    image = noise_image(77, 50)
    assert torch.equal(preprocess(image, config), reference(clip, image))


def test_from_processor_dict_size_forms():
    exact = PreprocessConfig.from_processor_dict({"size": {"height": 30, "width": 40}, "crop_size": [20, 24]},
                                                 pad_to_square=False)
    assert (exact.shortest_edge, exact.size_height, exact.size_width) == (None, 30, 40)
    assert (exact.crop_height, exact.crop_width) == (20, 24)
    square = PreprocessConfig.from_processor_dict({"size": 30, "default_to_square": True, "do_center_crop": False},
                                                  pad_to_square=False)
    assert (square.size_height, square.size_width) == (30, 30) and square.expected_size == (30, 30)


@pytest.mark.parametrize("settings, key", [
    ({"crop_pct": 0.9}, "crop_pct"),
    ({"do_normalize": False}, "do_normalize"),
    ({"do_rescale": False}, "do_rescale"),
    ({"do_resize": False}, "do_resize"),
    ({"size": {"shortest_edge": 336, "longest_edge": 1000}}, "longest_edge"),
    ({"size": {"height": 336}}, "width"),
    ({"size": "336"}, "size"),
    ({"crop_size": {"height": 336}}, "crop_size"),
    ({"resample": 99}, "resample"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({"data_format": "channels_last"}, "data_format"),
    ({"do_center_crop": False}, "fixed size"),
])
def test_from_processor_dict_rejects_unsupported(settings, key):
    with pytest.raises(ValueError, match=key):
        PreprocessConfig.from_processor_dict(settings, pad_to_square=False)


def test_from_processor_dict_ignores_unknown_keys_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        config = PreprocessConfig.from_processor_dict({"image_seq_length": 576, "size": 56, "crop_size": 56},
                                                      pad_to_square=False)
    assert config.expected_size == (56, 56)
    assert "image_seq_length" in caplog.text


def test_config_validation():
    with pytest.raises(ValueError, match="either shortest_edge"):
        PreprocessConfig(shortest_edge=None)
    with pytest.raises(ValueError, match="either shortest_edge"):
        PreprocessConfig(shortest_edge=10, size_height=10, size_width=10)
    with pytest.raises(ValueError, match="crop_height"):
        PreprocessConfig(crop_height=0)
    with pytest.raises(ValueError, match="rescale_factor"):
        PreprocessConfig(rescale_factor=float("nan"))
    config = PreprocessConfig(image_mean=[0.1, 0.2, 0.3])  # lists become tuples: hashable, cacheable
    assert config.image_mean == (0.1, 0.2, 0.3) and hash(config)


# --- anyres ----------------------------------------------------------------------------------------


def pinpoints_for(edge):
    return [[edge, 2 * edge], [2 * edge, edge], [2 * edge, 2 * edge], [3 * edge, edge], [edge, 3 * edge]]


def test_anyres_resolution_divergence_d1():
    pins = pinpoints_for(336)
    for size in [(300, 200), (16, 16)]:
        assert llava_preprocess.anyres_resolution(size, pins, hf_semantics=False) == (336, 672)
        assert llava_preprocess.anyres_resolution(size, pins, hf_semantics=True) == (672, 336)
    for size, expected in [((1024, 899), (672, 672)), ((500, 334), (672, 336)), ((333, 1000), (336, 1008)),
                           ((1, 1000), (336, 1008)), ((1000, 1), (1008, 336))]:
        assert llava_preprocess.anyres_resolution(size, pins, hf_semantics=False) == expected
        assert llava_preprocess.anyres_resolution(size, pins, hf_semantics=True) == expected


def test_select_best_resolution_first_wins_ties():
    assert llava_preprocess.select_best_resolution((10, 10), [(20, 40), (40, 20)]) == (20, 40)
    assert llava_preprocess.select_best_resolution((10, 10), [(40, 20), (20, 40)]) == (40, 20)
    assert llava_preprocess.select_best_resolution((100, 50), [(40, 20), (80, 40), (200, 100)]) == (200, 100)


ANYRES_SIZES = [(640, 480), (300, 200), (16, 16), (1, 1000), (1000, 1), (50, 33), (333, 1000), (704, 396)]


@pytest.mark.parametrize("edge", [336, 56])
@pytest.mark.parametrize("size", ANYRES_SIZES, ids=[f"{w}x{h}" for w, h in ANYRES_SIZES])
def test_anyres_hf_semantics_matches_llava_next_processor(edge, size):
    pins = pinpoints_for(edge)
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": edge},
                                           crop_size={"height": edge, "width": edge}, image_grid_pinpoints=pins)
    image = noise_image(*size, seed=edge)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    got = process_anyres_image(image, clip_config(edge, False), pins, hf_semantics=True)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def original_anyres_by_the_doc(image, edge, pins):
    """llava-formats.md §2.9 written out plainly, with the reference CLIP processor per piece."""
    width, height = image.size
    best, best_effective, best_wasted = None, 0, math.inf
    for cand_w, cand_h in pins:  # original reads (width, height)
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    target_w, target_h = best
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    tiles = [canvas.crop((x, y, x + edge, y + edge)) for y in range(0, target_h, edge)
             for x in range(0, target_w, edge)]
    processor = CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge})
    pieces = [image.resize((edge, edge))] + tiles
    return torch.stack([processor(piece, return_tensors="pt")["pixel_values"][0] for piece in pieces])


@pytest.mark.parametrize("edge", [336, 56])
@pytest.mark.parametrize("size", ANYRES_SIZES, ids=[f"{w}x{h}" for w, h in ANYRES_SIZES])
def test_anyres_original_semantics_matches_the_doc(edge, size):
    pins = pinpoints_for(edge)
    image = smooth_image(*size)
    expected = original_anyres_by_the_doc(image, edge, pins)
    got = process_anyres_image(image, clip_config(edge, True), pins, hf_semantics=False)
    assert torch.equal(got, expected)


def test_anyres_semantics_differ_on_a_tie():
    pins = pinpoints_for(336)
    image = noise_image(300, 200)
    original = process_anyres_image(image, clip_config(336, False), pins, hf_semantics=False)
    transformers_like = process_anyres_image(image, clip_config(336, False), pins, hf_semantics=True)
    assert original.shape == transformers_like.shape == (3, 3, 336, 336)
    assert torch.equal(original[0], transformers_like[0])  # same squashed base image
    assert not torch.equal(original[1:], transformers_like[1:])  # 336×672 vs 672×336 canvas


def test_grid_pinpoints_parsing_and_errors():
    assert llava_preprocess.parse_grid_pinpoints("[(336, 672), (672, 336)]") == ((336, 672), (672, 336))
    assert llava_preprocess.parse_grid_pinpoints([[1, 2]]) == ((1, 2),)
    for bad in ["(1x1),...,(3x3)", [], [[1, 2, 3]], [[0, 2]], "not a list", [[1.5, 2]]]:
        with pytest.raises(ValueError, match="image_grid_pinpoints"):
            llava_preprocess.parse_grid_pinpoints(bad)
    with pytest.raises(ValueError, match="multiple of the tile size"):
        process_anyres_image(noise_image(40, 30), clip_config(56, False), [[56, 100]], hf_semantics=False)
    with pytest.raises(ValueError, match="divide"):
        llava_preprocess.divide_to_patches(noise_image(50, 56), 56)
