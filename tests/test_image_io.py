"""llava_image_io: sources, mode conversion, EXIF, animation, refusals (all generated images, no blobs)."""

import base64
import io
import logging
import struct
import time
import urllib.parse
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

import llava_image_io
from llava_image_io import ImageError, image_digest, load_image

NAME = "image 2 (cat.png)"


def encode(image, fmt, **params):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width=37, height=23, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8))


def data_url(data, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width, height):
    """A PNG that declares width×height, then a 16-byte IDAT: no real pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4))


def bmp_header(width, height):
    """A 24-bit BMP file header + info header declaring width×height, without pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + info  # file size 0: unknown, allowed


def rgb_array(image):
    assert image.mode == "RGB"
    return np.asarray(image)


# --- sources ---------------------------------------------------------------------------------------


def test_every_source_kind_gives_the_same_rgb(tmp_path):
    original = noise()
    png = encode(original, "PNG")
    path = tmp_path / "cat.png"
    path.write_bytes(png)
    sources = [png, bytearray(png), memoryview(png), str(path), path, data_url(png), original]
    for source in sources:
        loaded = load_image(source, name=NAME)
        assert loaded.mode == "RGB" and loaded.size == (37, 23)
        assert np.array_equal(rgb_array(loaded), np.asarray(original)), type(source)


def test_data_url_variants():
    png = encode(noise(), "PNG")
    b64 = base64.b64encode(png).decode("ascii")
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)).rstrip("=")  # line breaks, no padding
    percent = "data:image/png," + urllib.parse.quote_from_bytes(png)
    for url in [f"data:image/png;base64,{wrapped}", f"DATA:IMAGE/PNG;charset=x;BASE64,{b64}", percent]:
        assert np.array_equal(rgb_array(load_image(url, name=NAME)), np.asarray(noise()))


def test_mislabelled_image_mime_is_accepted_and_logged(caplog):
    png = encode(noise(), "PNG")
    with caplog.at_level(logging.DEBUG, logger="llava_image_io"):
        loaded = load_image(data_url(png, "image/jpeg"), name=NAME)
    assert np.array_equal(rgb_array(loaded), np.asarray(noise()))
    assert any("image/jpeg" in record.getMessage() and "image/png" in record.getMessage()
               for record in caplog.records)


def test_caller_image_is_not_modified():
    rgba = noise(mode="RGBA")
    before = rgba.tobytes()
    loaded = load_image(rgba, name=NAME)
    assert loaded is not rgba and rgba.mode == "RGBA" and rgba.tobytes() == before
    rgb = noise()
    assert load_image(rgb, name=NAME) is not rgb


# --- modes -----------------------------------------------------------------------------------------


def _reference_mode_images():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (19, 29, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0
    palette = Image.fromarray(rgba[:, :, :3]).quantize(colors=8)
    transparent = palette.copy()
    transparent.info["transparency"] = 2
    gray = Image.fromarray(rgba[:, :, 0])
    return {
        "RGBA": Image.fromarray(rgba), "LA": Image.fromarray(rgba).convert("LA"), "P": palette,
        "P+transparency": transparent, "L": gray, "1": gray.convert("1"),
        "CMYK": Image.fromarray(rgba).convert("CMYK"), "YCbCr": Image.fromarray(rgba[:, :, :3]).convert("YCbCr"),
    }


@pytest.mark.parametrize("mode", list(_reference_mode_images()))
def test_8bit_modes_convert_exactly_like_the_reference(mode):
    raw = _reference_mode_images()[mode]
    expected = np.asarray(raw.convert("RGB"))
    assert np.array_equal(rgb_array(load_image(raw, name=NAME)), expected)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP", "BMP", "GIF"])
def test_encoded_modes_convert_like_the_reference(fmt):
    for mode, raw in _reference_mode_images().items():
        try:
            data = encode(raw, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        except (OSError, ValueError):
            continue  # this format cannot store this mode
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(rgb_array(load_image(data, name=NAME)), expected), (fmt, mode)


def test_alpha_is_dropped_not_composited():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 30)  # fully transparent, stored colour kept (as the reference)
    assert np.all(rgb_array(load_image(Image.fromarray(rgba), name=NAME)) == (200, 10, 30))


def test_16bit_png_gradient_maps_to_full_8bit_range():
    values = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    loaded = rgb_array(load_image(data, name=NAME))
    expected = np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # round(v / 257)
    assert np.array_equal(loaded[..., 0], expected)
    assert loaded.min() == 0 and loaded[-1, -1, 0] == 255 and np.all(np.diff(loaded[..., 0].ravel()) >= 0)
    assert np.array_equal(loaded[..., 0], loaded[..., 2])  # gray replicated
    # ... where the reference's convert("RGB") would clip nearly everything to white:
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == 255).mean() > 0.99


def test_16bit_big_endian_and_pgm():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert rgb_array(load_image(big_endian, name=NAME))[0, :, 0].tolist() == [0, 1, 128, 255]
    pgm = b"P5\n4 1\n65535\n" + values.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    assert rgb_array(load_image(pgm, name=NAME))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_int32_mode_ranges():
    def gray(values):
        return rgb_array(load_image(Image.fromarray(np.array([values], dtype=np.int32)), name=NAME))[0, :, 0].tolist()

    assert gray([0, 17, 255]) == [0, 17, 255]  # 8-bit data in an int container: unchanged
    assert gray([0, 257, 65535]) == [0, 1, 255]  # 16-bit range: round(v / 257)
    assert gray([-100, 0, 100]) == [0, 128, 255]  # anything else: stretched min..max
    assert gray([5, 5]) == [5, 5]


def test_float_mode_ranges():
    def gray(values):
        return rgb_array(load_image(Image.fromarray(np.array([values], dtype=np.float32)), name=NAME))[0, :, 0].tolist()

    assert gray([0.0, 0.5, 1.0, -0.2]) == [0, 128, 255, 0]  # 0..1 data
    assert gray([0.0, 100.4, 300.0, 1.0]) == [0, 100, 255, 1]  # 0..255 data, clipped
    assert gray([float("nan"), 1.0]) == [0, 255]


# --- EXIF ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation(orientation, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(noise(40, 20), fmt, exif=exif)
    decoded = Image.open(io.BytesIO(data))
    plain = load_image(data, name=NAME)
    assert np.array_equal(rgb_array(plain), np.asarray(decoded.convert("RGB")))  # original LLaVA: no transpose
    transposed = load_image(data, name=NAME, exif_transpose=True)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(rgb_array(transposed), np.asarray(expected))
    assert transposed.size == ((20, 40) if orientation >= 5 else (40, 20))
    if 2 <= orientation <= 4:  # same size, pixels moved (5-8 already differ in size)
        assert not np.array_equal(rgb_array(transposed), rgb_array(plain))


# --- animation / multi-frame -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt, params", [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {}), ("TIFF", {})])
def test_first_frame_of_multi_frame_files(fmt, params):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    frames = [Image.new("RGB", (16, 12), colour) for colour in colours]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    loaded = rgb_array(load_image(data, name=NAME))
    assert np.all(np.abs(loaded.astype(int) - colours[0]) <= 4)  # GIF palette may shift a colour slightly


# --- refusals --------------------------------------------------------------------------------------


def _truncated_png():
    data = encode(noise(64, 64, seed=3), "PNG")
    return data[: len(data) // 2]


def _truncated_jpeg():
    data = encode(noise(64, 64, seed=3), "JPEG")
    return data[: len(data) // 2]


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.mark.parametrize("source, reason", [
    (b"", "empty"),
    (b"this is not an image at all, just some text", "not a recognised image"),
    (_truncated_png(), "cannot decode"),
    (_truncated_jpeg(), "cannot decode"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot decode|not a recognised"),
    (SVG, "SVG"),
    (b"\xef\xbb\xbf  <svg></svg>", "SVG"),
    (EPS, "not a recognised image"),  # PIL knows EPS, but it runs Ghostscript: not on our allowlist
    ("data:image/png;base64,@@@not-base64@@@", "invalid base64"),
    ("data:image/png;base64,QUJD=QUJD", "invalid base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image type"),
    ("data:;base64,aGVsbG8=", "not an image type"),
    ("data:application/octet-stream;base64," + base64.b64encode(encode(noise(), "PNG")).decode(), "not an image type"),
    ("data:image/png;base64", "malformed data URL"),
    ("data:image/svg+xml;base64," + base64.b64encode(SVG).decode(), "SVG"),
    ("data:image/png;base64," + base64.b64encode(b"plain text").decode(), "not a recognised image"),
    ("https://example.com/cat.png", "remote URLs"),
    ("/nonexistent/dir/cat.png", "cannot read file"),
    (12345, "unsupported image source type int"),
    (Image.new("RGB", (0, 0)), "no pixels"),
])
def test_bad_inputs_raise_image_error_naming_the_image(source, reason):
    with pytest.raises(ImageError, match=reason) as caught:
        load_image(source, name=NAME)
    assert str(caught.value).startswith(NAME + ": ")
    assert caught.value.image_name == NAME and isinstance(caught.value, ValueError)


def test_directory_path_is_refused(tmp_path):
    with pytest.raises(ImageError, match="cannot read file") as caught:
        load_image(tmp_path, name=NAME)
    assert NAME in str(caught.value)


def test_eps_would_be_identified_by_pil_without_the_allowlist():
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # so the refusal above is the allowlist at work


@pytest.mark.parametrize("header", [png_header, bmp_header])
def test_size_limit_checked_from_header_before_decoding(header):
    # 9000×9000 = 81 MP: under PIL's own limit (~89 MP), over our default (67 MP). The file has no
    # pixel data, so "too large" (and not "truncated") proves nothing was decoded.
    with pytest.raises(ImageError, match="too large: 9000x9000 = 81000000 pixels") as caught:
        load_image(header(9000, 9000), name=NAME)
    assert NAME in str(caught.value)
    with pytest.raises(ImageError, match="exceeds the limit of 100 pixels"):
        load_image(encode(noise(11, 10), "PNG"), name=NAME, max_pixels=100)
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(noise(11, 10), name=NAME, max_pixels=100)
    assert load_image(encode(noise(10, 10), "PNG"), name=NAME, max_pixels=100).size == (10, 10)


@pytest.mark.parametrize("header", [png_header, bmp_header])
def test_decompression_bomb_refused_even_without_our_limit(header):
    before = Image.MAX_IMAGE_PIXELS
    for max_pixels in (llava_image_io.DEFAULT_MAX_PIXELS, None):
        with pytest.raises(ImageError, match="too large") as caught:
            load_image(header(100000, 100000), name=NAME, max_pixels=max_pixels)
        assert NAME in str(caught.value)
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's process-wide limit is never touched


def test_pil_bomb_warning_raised_as_error_is_wrapped():
    # Between PIL's warning (~89 MP) and error (~179 MP) thresholds, with our limit off and the host
    # turning warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="too large to decode safely"):
            load_image(png_header(10000, 9500), name=NAME, max_pixels=None)


def test_without_limit_the_same_kind_of_file_reaches_the_decoder():
    # Shows the "too large" refusals above are the header check: past it, these files fail to decode.
    with pytest.raises(ImageError, match="too large"):
        load_image(png_header(1000, 1000), name=NAME, max_pixels=999_999)
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(png_header(1000, 1000), name=NAME, max_pixels=None)


# --- digest ----------------------------------------------------------------------------------------


def test_image_digest():
    image = noise()
    same_pixels_other_container = load_image(encode(image, "BMP"), name=NAME)
    assert image_digest(image) == image_digest(same_pixels_other_container)
    assert len(image_digest(image)) == 32
    changed = image.copy()
    changed.putpixel((0, 0), (1, 2, 3) if image.getpixel((0, 0)) != (1, 2, 3) else (4, 5, 6))
    assert image_digest(changed) != image_digest(image)
    flat = np.asarray(image).reshape(-1, 3)
    reshaped = Image.fromarray(flat.reshape(37, 23, 3))  # same bytes, other size
    assert image_digest(reshaped) != image_digest(image)
    assert image_digest(image.convert("RGBA")) != image_digest(image)


def test_image_digest_of_a_large_image_hashes_every_piece():
    """Above 1 MB of pixels the digest is a tree over 1 MB pieces hashed in parallel: a change in any
    piece, the last one included, changes it; equal pixels give equal digests."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(700, 800, 3), dtype=np.uint8)  # 1.68 MB: two pieces
    image = Image.fromarray(pixels)
    assert image_digest(image) == image_digest(Image.fromarray(pixels.copy()))
    for y, x in ((0, 0), (699, 799)):
        changed = pixels.copy()
        changed[y, x, 2] ^= 1
        assert image_digest(Image.fromarray(changed)) != image_digest(image)


def test_run_parallel_keeps_order_and_waits_for_every_item_before_raising():
    assert llava_image_io.run_parallel(lambda n: n * n, list(range(7))) == [n * n for n in range(7)]
    assert llava_image_io.run_parallel(lambda n: n, []) == []
    # The calling thread runs the first item; when it fails, the workers' items (which may write into
    # the same buffers) still finish before the error reaches the caller, and a worker's error surfaces too.
    finished = []

    def work(item):
        if item == 0:
            raise ValueError("first item failed")
        time.sleep(0.05)
        finished.append(item)

    with pytest.raises(ValueError, match="first item"):
        llava_image_io.run_parallel(work, [0, 1, 2])
    assert sorted(finished) == [1, 2]

    def fail_in_worker(item):
        if item == 2:
            raise RuntimeError("worker item failed")

    with pytest.raises(RuntimeError, match="worker item"):
        llava_image_io.run_parallel(fail_in_worker, [0, 1, 2])

