"""A corpus of bad and odd images, generated at test time (no binary blobs in the repository).

``corpus()`` returns :class:`Case` objects. Bad cases must be refused with a message naming the image
and matching ``reason``; valid cases (odd sizes, every PIL mode, 16-bit, animations, EXIF orientations,
multi-page TIFF, a mislabelled MIME type) must decode to an RGB image of ``size``.

A case reaches the code under test as a file (``data`` with ``filename``: the CLI and the webui UI,
whose attachment MIME type comes from the file suffix) and/or as a ``data:`` URL (``url``: the OpenAI
API). Cases whose point is the data URL itself (a non-image MIME type, invalid base64) have no file
form (``data`` is None).
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# What webui's UI accepts as image attachments; other suffixes are read as text files
# (chat.py add_message_attachment), so such cases are uploaded under "<name>.png".
UI_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

MIME_BY_FORMAT = {
    "PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp",
    "BMP": "image/bmp", "TIFF": "image/tiff",
}
SUFFIX_BY_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}

# Refusal reasons (regexes on the message after "<name>: ").
DECODE_FAILED = r"cannot decode image|not a recognised image"
NOT_AN_IMAGE = r"not a recognised image"
TOO_LARGE = r"too large"


@dataclass(frozen=True)
class Case:
    id: str
    filename: str
    data: bytes | None
    url: str
    valid: bool
    reason: str = ""
    size: tuple[int, int] | None = None

    @property
    def has_file(self) -> bool:
        return self.data is not None

    @property
    def ui_filename(self) -> str:
        return self.filename if self.filename.lower().endswith(UI_IMAGE_SUFFIXES) else self.filename + ".png"


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def picture(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    """Seeded RGB noise over a gradient (compresses badly, so truncation always cuts pixel data)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], axis=-1)
    noisy = (base * 0.5 + rng.integers(0, 128, (height, width, 3))).astype(np.uint8)
    return Image.fromarray(noisy)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width×height followed by a tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def bmp_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + info + b"\x00" * 64


def gif_declaring(width: int, height: int) -> bytes:
    """GIF89a whose screen and single image descriptor declare width×height (LZW data for one pixel)."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return header + descriptor + b"\x02\x02\x44\x01\x00;"


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 frame header is rewritten to declare width×height."""
    data = bytearray(encode(picture(16, 16), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def corrupt_body(data: bytes, keep: int) -> bytes:
    """The first ``keep`` bytes (magic and header) followed by seeded garbage of the original length."""
    rng = np.random.default_rng(len(data))
    return data[:keep] + rng.integers(0, 256, max(len(data) - keep, 64), dtype=np.uint8).tobytes()


def animated(fmt: str) -> tuple[bytes, tuple[int, int]]:
    frames = [picture(24, 18, seed=s) for s in range(3)]
    params = {"save_all": True, "append_images": frames[1:], "duration": 50, "loop": 0}
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(frames[0], fmt, **params), (24, 18)


def mode_image(mode: str) -> Image.Image:
    """A 20×12 image natively in ``mode`` with varied pixel values."""
    rgb = picture(20, 12, seed=7)
    if mode == "I;16":
        values = np.arange(240, dtype=np.uint16).reshape(12, 20) * 273
        return Image.frombytes("I;16", (20, 12), values.astype("<u2").tobytes())
    if mode == "I":
        return Image.fromarray((np.arange(240, dtype=np.int32).reshape(12, 20) * 1000 - 50_000))
    if mode == "F":
        return Image.fromarray(np.linspace(0, 1, 240, dtype=np.float32).reshape(12, 20))
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 0
        return image
    return rgb.convert(mode)


# Container per mode: the format that stores the mode natively.
MODE_FORMATS = {
    "1": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "RGBA": "PNG", "CMYK": "JPEG",
    "I;16": "PNG", "I": "TIFF", "F": "TIFF", "YCbCr": "JPEG",
}


def _file_case(case_id: str, filename: str, data: bytes, mime: str, valid: bool, reason: str = "",
               size: tuple[int, int] | None = None) -> Case:
    return Case(case_id, filename, data, data_url(data, mime), valid, reason, size)


@lru_cache(maxsize=1)
def corpus() -> tuple[Case, ...]:
    cases: list[Case] = []
    add = cases.append
    sample = picture(40, 30)
    originals = {
        "PNG": encode(sample, "PNG"),
        "JPEG": encode(sample, "JPEG", quality=90),
        "GIF": encode(sample.convert("P"), "GIF"),
        "WEBP": encode(sample, "WEBP", lossless=True),
        "BMP": encode(sample, "BMP"),
        "TIFF": encode(sample, "TIFF"),
    }
    # Bytes that identify each format (so a "corrupt" file is still recognised as that format).
    # BMP pixel data has no structure that garbage could break, so its header is what gets corrupted.
    header_bytes = {"PNG": 33, "JPEG": 20, "GIF": 13, "WEBP": 20, "BMP": 2, "TIFF": 8}

    # --- bad: truncated and corrupt files of every format -------------------------------------------
    for fmt, data in originals.items():
        suffix, mime = SUFFIX_BY_FORMAT[fmt], MIME_BY_FORMAT[fmt]
        add(_file_case(f"truncated-{fmt.lower()}", f"truncated{suffix}", truncated(data), mime, False, DECODE_FAILED))
        add(_file_case(f"corrupt-{fmt.lower()}", f"corrupt{suffix}", corrupt_body(data, header_bytes[fmt]), mime,
                       False, DECODE_FAILED))
    add(_file_case("zero-bytes", "empty.png", b"", "image/png", False, r"empty data"))
    add(_file_case("text-bytes", "notes.png", b"Dear diary, today I uploaded the wrong file.\n" * 20, "image/png",
                   False, NOT_AN_IMAGE))
    add(_file_case("random-bytes", "noise.jpg", np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)
                   .tobytes(), "image/jpeg", False, NOT_AN_IMAGE))
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    add(_file_case("pdf-bytes-as-png", "report.png", pdf, "image/png", False, NOT_AN_IMAGE))
    # EPS is a format PIL knows but that must never be opened from a request (it runs Ghostscript).
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    add(_file_case("eps-outside-allowlist", "figure.png", eps, "image/png", False, NOT_AN_IMAGE))
    add(_file_case("zero-width-png", "flat.png", png_declaring(0, 10), "image/png", False,
                   r"no pixels|cannot decode image|not a recognised image"))
    bad_crc = bytearray(originals["PNG"])
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    add(_file_case("png-bad-header-crc", "crc.png", bytes(bad_crc), "image/png", False, DECODE_FAILED))
    svg = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
           b'<rect width="10" height="10" fill="red"/></svg>')
    add(_file_case("svg-file", "drawing.png", svg, "image/png", False, r"SVG"))
    add(Case("svg-data-url", "drawing.svg", None, data_url(svg, "image/svg+xml"), False, r"SVG"))

    # --- bad: decompression bombs (huge declared dimensions, almost no data) -----------------------
    add(_file_case("bomb-png", "bomb.png", png_declaring(100_000, 100_000), "image/png", False, TOO_LARGE))
    add(_file_case("bomb-bmp", "bomb.bmp", bmp_declaring(60_000, 60_000), "image/bmp", False, TOO_LARGE))
    add(_file_case("bomb-gif", "bomb.gif", gif_declaring(65_535, 65_535), "image/gif", False, TOO_LARGE))
    # Above our limit (8192² pixels), below PIL's own warning threshold: refused by the header check.
    add(_file_case("bomb-png-moderate", "big.png", png_declaring(9_000, 9_000), "image/png", False, TOO_LARGE))
    add(_file_case("bomb-jpeg", "bomb.jpg", jpeg_declaring(60_000, 60_000), "image/jpeg", False, TOO_LARGE))

    # --- bad: data URLs (API only) ----------------------------------------------------------------
    png = originals["PNG"]
    add(Case("mime-text-plain", "text.txt", None, data_url(png, "text/plain"), False, r"MIME type 'text/plain'"))
    add(Case("mime-application-pdf", "doc.pdf", None, data_url(png, "application/pdf"), False,
             r"MIME type 'application/pdf'"))
    add(Case("mime-missing", "nomime", None, "data:;base64," + base64.b64encode(png).decode(), False,
             r"MIME type 'text/plain'"))
    add(Case("invalid-base64", "b64.png", None, "data:image/png;base64,iVBORw0KGgo!!!*not*base64***", False,
             r"invalid base64"))
    add(Case("data-url-without-comma", "nocomma.png", None, "data:image/png;base64", False, r"malformed data URL"))
    add(Case("image-mime-pdf-bytes", "fake.png", None, data_url(pdf, "image/png"), False, NOT_AN_IMAGE))

    # --- valid: odd sizes ---------------------------------------------------------------------------
    for width, height in ((1, 1), (1, 20_000), (20_000, 1)):
        image = Image.new("RGB", (width, height), (200, 30, 90))
        if width * height > 1:
            stripes = np.zeros((height, width, 3), dtype=np.uint8)
            stripes[..., 0] = (np.arange(max(width, height)) % 256).reshape(height, width)
            image = Image.fromarray(stripes)
        add(_file_case(f"size-{width}x{height}", f"size_{width}x{height}.png", encode(image, "PNG"), "image/png",
                       True, size=(width, height)))

    # --- valid: every PIL mode (and 16-bit PNG) ------------------------------------------------------
    for mode, fmt in MODE_FORMATS.items():
        image = mode_image(mode)
        params = {"quality": 95} if fmt == "JPEG" else {}
        data = encode(image, fmt, **params)
        add(_file_case(f"mode-{mode}", f"mode_{mode.replace(';', '_')}{SUFFIX_BY_FORMAT[fmt]}", data,
                       MIME_BY_FORMAT[fmt], True, size=image.size))
    gradient = np.linspace(0, 65535, 30 * 40).astype(np.uint16).reshape(30, 40)
    png16 = encode(Image.frombytes("I;16", (40, 30), gradient.astype("<u2").tobytes()), "PNG")
    add(_file_case("png-16bit-gradient", "deep.png", png16, "image/png", True, size=(40, 30)))

    # --- valid: animations (first frame) and multi-page TIFF -----------------------------------------
    for fmt, suffix in (("GIF", ".gif"), ("WEBP", ".webp")):
        data, size = animated(fmt)
        add(_file_case(f"animated-{fmt.lower()}", f"anim{suffix}", data, MIME_BY_FORMAT[fmt], True, size=size))
    data, size = animated("PNG")
    add(_file_case("animated-apng", "anim.png", data, "image/png", True, size=size))
    pages = [picture(22, 14, seed=s) for s in range(3)]
    add(_file_case("multi-page-tiff", "pages.tiff", encode(pages[0], "TIFF", save_all=True,
                                                           append_images=pages[1:]), "image/tiff", True,
                   size=(22, 14)))

    # --- valid: EXIF orientations 1-8 (stored size: the reference ignores EXIF by default) -----------
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(picture(36, 20, seed=orientation), "JPEG", quality=90, exif=exif)
        add(_file_case(f"exif-orientation-{orientation}", f"exif{orientation}.jpg", data, "image/jpeg", True,
                       size=(36, 20)))

    # --- valid: mislabelled MIME type (the content decides) ----------------------------------------
    jpeg = originals["JPEG"]
    add(Case("mime-disagrees-with-bytes", "photo.png", jpeg, data_url(jpeg, "image/png"), True, size=(40, 30)))

    ids = [case.id for case in cases]
    if len(set(ids)) != len(ids):
        raise RuntimeError("duplicate case ids in the bad-image corpus")
    return tuple(cases)


def bad_cases() -> list[Case]:
    return [case for case in corpus() if not case.valid]


def valid_cases() -> list[Case]:
    return [case for case in corpus() if case.valid]
