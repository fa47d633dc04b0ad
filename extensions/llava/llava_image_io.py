"""Image decoding for the LLaVA pipeline: bytes, paths, data URLs or PIL images in, RGB PIL images out.

Contract: `load_image` returns a fully decoded, detached `PIL.Image.Image` in mode "RGB" (size W×H),
converted exactly as the reference does (`Image.convert("RGB")`, llava-formats.md §2.7, §6), except for
high-bit-depth modes where that conversion is garbage (see `_to_8bit`). Every failure is an
`ImageError` whose message names the image and the reason. Remote URLs are never fetched here.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import functools
import hashlib
import io
import logging
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_cache import BoundedLRU

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)

# 8192×8192 (~67 MP, ~200 MB as RGB): above any real camera photo we expect in chat, below PIL's own
# DecompressionBombWarning threshold (~89 MP) so a refused image does not also trigger PIL's warning.
DEFAULT_MAX_PIXELS = 8192 * 8192

# Raster formats we let PIL try (JPEG includes multi-picture MPO; AVIF and HEIF only where this Pillow
# build or a plugin such as pillow-heif provides them). An allowlist keeps exotic or risky plugins off
# the request path (EPS shells out to Ghostscript; FITS, GRIB, PSD, ... are never chat images).
ACCEPTED_FORMATS = (
    "PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "JPEG2000", "AVIF", "HEIF",
)

# How many leading bytes we look at to recognise SVG (an XML prolog and comments may come first).
_SNIFF_BYTES = 1024


class ImageError(ValueError):
    """An image could not be loaded. `str(err)` is "<name>: <reason>", fit to show to a user."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.image_name = name
        self.reason = reason


def load_image(
    source: str | os.PathLike | bytes | bytearray | memoryview | Image.Image,
    *,
    name: str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = False,
) -> Image.Image:
    """Decode `source` into a detached RGB PIL image (first frame of animations / multi-page files).

    Args:
        source: a file path (str or PathLike), raw encoded bytes, a ``data:image/...;base64,...`` URL, or a
            PIL image (used at its current frame and not modified; a converted copy is returned). A data
            URL must declare an ``image/*`` type (anything else, or none, is refused); an image type that
            names another image format than the content (a PNG sent as image/jpeg) is accepted, since the
            content decides, and logged at debug level.
        name: how the image is called in error messages, e.g. ``"image 2 (cat.png)"``.
        max_pixels: refuse images whose declared width×height exceeds this, checked from the header
            before any pixel data is decoded. None disables our check; PIL's own process-wide limit
            (``Image.MAX_IMAGE_PIXELS``, never changed here) still raises beyond twice its value.
        exif_transpose: apply ``ImageOps.exif_transpose`` as ``transformers.image_utils.load_image`` does.
            The default False is what original LLaVA does (llava-formats.md §1 item 10).

    Returns:
        PIL image, mode "RGB", size (W, H).

    Mode conversion: everything goes through ``convert("RGB")`` like the reference (alpha is dropped
    without compositing, palettes expanded, CMYK by PIL's naive formula), **except** high-bit-depth
    single-channel modes, where ``convert("RGB")`` clips to 0..255 (a 16-bit photo turns white, a 0..1
    float image turns black). Those are deliberately scaled to 8 bit first (a documented deviation from
    the reference, which produces garbage for them):

    * ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` (16-bit PNG / TIFF): ``round(v / 257)``, i.e. rounded
      rather than ``v >> 8``; both map ``257*k`` back to ``k``, rounding is the closer approximation.
    * ``I`` (int32; 16-bit PGM opens this way): the bit depth is not recorded, so it is inferred from the
      values: all in 0..255 → kept as 8-bit; all in 0..65535 → treated as 16-bit as above; anything
      else (negative or wider) → linearly stretched from its own min..max to 0..255.
    * ``F`` (float32): NaN → 0, +inf → 255, -inf → 0; then if the largest value is ≤ 1 the data is
      taken as 0..1 and multiplied by 255, otherwise as 0..255; then clipped to 0..255 and rounded.

    Raises:
        ImageError: unreadable file, invalid base64, non-image data-URL MIME type, SVG, unknown or
            truncated/corrupt data, zero-sized or too large image, remote URL.
    """
    try:
        if isinstance(source, Image.Image):
            return _finish(source, name=name, max_pixels=max_pixels, exif_transpose=exif_transpose)
        if isinstance(source, (bytes, bytearray, memoryview)):
            return _decode_bytes(bytes(source), name=name, max_pixels=max_pixels,
                                 exif_transpose=exif_transpose, declared_mime=None)
        if isinstance(source, str) and source[:5].lower() == "data:":
            data, mime = _parse_data_url(source, name=name)
            return _decode_bytes(data, name=name, max_pixels=max_pixels,
                                 exif_transpose=exif_transpose, declared_mime=mime)
        if isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):
            raise ImageError(name, "remote URLs are not fetched here; download the image first")
        if isinstance(source, (str, os.PathLike)):
            return _decode_file(Path(source), name=name, max_pixels=max_pixels,
                                exif_transpose=exif_transpose)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own limit fired inside Image.open (the warning only arrives as an exception when the
        # host turned warnings into errors); either way nothing was decoded.
        raise ImageError(name, f"image is too large to decode safely ({exc})") from exc
    except MemoryError as exc:
        raise ImageError(name, "not enough memory to decode the image") from exc
    except Exception as exc:  # noqa: BLE001
        # PIL's format plugins signal corrupt input with a zoo of types (OSError, SyntaxError,
        # struct.error, EOFError, IndexError, ValueError, ...); a bad upload must never surface as a
        # traceback, so wrap them all, keeping the cause chained for the log.
        raise ImageError(name, f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    raise ImageError(name, f"unsupported image source type {type(source).__name__}")


def image_digest(image: Image.Image) -> bytes:
    """Content hash of a decoded image for the embedding cache: 32 bytes over mode, size and pixels.

    Two images get the same digest iff they have the same mode, size and raw pixel bytes, whatever file
    format or container they came from. A tree of sha256 (current x86 and ARM CPUs compute it in
    hardware): the pixel bytes are hashed in 1 MB pieces on worker threads (hashlib releases the GIL),
    then the header and the pieces' digests are hashed together; a photo's digest takes a fraction
    of one sequential pass.
    """
    pixels = memoryview(image.tobytes())
    pieces = [pixels[start:start + _DIGEST_PIECE] for start in range(0, len(pixels), _DIGEST_PIECE)]
    piece_digests = run_parallel(lambda piece: hashlib.sha256(piece).digest(), pieces)
    hasher = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:{len(pieces)}:".encode("ascii"))
    for digest in piece_digests:
        hasher.update(digest)
    return hasher.digest()


_DIGEST_PIECE = 1 << 20


@functools.lru_cache(maxsize=1)
def worker_threads() -> int:
    """Threads of :func:`worker_pool`: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def run_parallel(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[function(item) for item in items]``, the items after the first on :func:`worker_pool` threads.

    The calling thread computes the first item itself instead of idling until the pool is done: waking
    one fewer thread per call measurably shortens short jobs (on a 2-core VM it took a resize from 12.0
    to 6.9 ms). Returns only once every item has finished, even when one fails (callers' items may write
    into shared buffers), then raises the first error in item order.
    """
    if len(items) <= 1:
        return [function(item) for item in items]
    futures = [worker_pool().submit(function, item) for item in items[1:]]
    try:
        first = function(items[0])
    finally:
        concurrent.futures.wait(futures)
    return [first, *(future.result() for future in futures)]


@functools.lru_cache(maxsize=1)
def worker_pool() -> ThreadPoolExecutor:
    """Threads for image work that releases the GIL (PIL's resampling, hashlib on large buffers),
    shared by all requests; created on first use, never at import. Tasks must not wait on the pool."""
    return ThreadPoolExecutor(max_workers=worker_threads(), thread_name_prefix="llava-image")


def source_digest(source: str | bytes) -> str:
    """Content hash of an encoded image (a data URL or file bytes) for the embedding cache: sha256, hex.

    Cheaper than :func:`image_digest` (no decoding), so a turn whose images are all cached decodes none.
    A collision-resistant hash, because one user's key must never find another user's image. Chats
    re-send every image on every turn, so recent digests are remembered with their whole source, filed
    under a cheap probe (length and both ends of the text): a hit requires the new source to equal the
    remembered one, as exact as hashing again for one memcmp (nothing at all when the caller re-sends
    the same object) instead of a sha256 pass. Two sources with the same probe replace each other.
    """
    if isinstance(source, bytearray):
        source = bytes(source)
    probe = (type(source), len(source), source[:_PROBE_ENDS], source[-_PROBE_ENDS:])
    remembered = _recent_digests.get(probe)
    if remembered is not None and remembered[0] == source:
        return remembered[1]
    data = source.encode("utf-8", "surrogatepass") if isinstance(source, str) else source
    digest = hashlib.sha256(data).hexdigest()
    _recent_digests.put(probe, (source, digest))
    return digest


_PROBE_ENDS = 64  # characters from each end of a source in its probe
# probe -> (source, digest), bounded by the sources' total length: 64 MB of data URLs holds every image
# of a long chat (a photo is 1 to 5 MB as a data URL).
_recent_digests: BoundedLRU[tuple[str | bytes, str]] = BoundedLRU(64 * 2**20, cost=lambda entry: len(entry[0]))


# --- sources ---------------------------------------------------------------------------------------


def _parse_data_url(url: str, *, name: str) -> tuple[bytes, str]:
    """Split ``data:<mime>[;params][;base64],<payload>`` into (decoded bytes, lower-case MIME)."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageError(name, "malformed data URL: no ',' before the payload")
    parts = [part.strip() for part in header.split(";")]
    # RFC 2397: an omitted media type means text/plain, which is not an image.
    mime = parts[0].lower() or "text/plain"
    is_base64 = any(part.lower() == "base64" for part in parts[1:])
    if mime == "image/svg+xml":
        raise ImageError(name, "SVG (vector) images are not supported; convert it to PNG or JPEG")
    if not mime.startswith("image/"):
        raise ImageError(name, f"data URL has MIME type {mime!r}, not an image type")
    if not is_base64:
        return urllib.parse.unquote_to_bytes(payload), mime
    # Tolerate line breaks and missing '=' padding (common in hand-made data URLs), nothing else.
    compact = "".join(payload.split())
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(name, f"invalid base64 in data URL ({exc})") from exc
    return data, mime


def _decode_file(path: Path, *, name: str, max_pixels: int | None, exif_transpose: bool) -> Image.Image:
    try:
        handle = path.open("rb")
    except OSError as exc:
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        raise ImageError(name, f"cannot read file {shown!r}: {exc.strerror or exc}") from exc
    with handle:
        head = handle.read(_SNIFF_BYTES)
        handle.seek(0)
        return _open_and_finish(handle, head, name=name, max_pixels=max_pixels,
                                exif_transpose=exif_transpose, declared_mime=None)


def _decode_bytes(data: bytes, *, name: str, max_pixels: int | None, exif_transpose: bool,
                  declared_mime: str | None) -> Image.Image:
    return _open_and_finish(io.BytesIO(data), data[:_SNIFF_BYTES], name=name, max_pixels=max_pixels,
                            exif_transpose=exif_transpose, declared_mime=declared_mime)


def _open_and_finish(stream, head: bytes, *, name: str, max_pixels: int | None, exif_transpose: bool,
                     declared_mime: str | None) -> Image.Image:
    if not head:
        raise ImageError(name, "empty data (0 bytes)")
    if _looks_like_svg(head):
        raise ImageError(name, "SVG (vector) images are not supported; convert it to PNG or JPEG")
    formats = _available_formats()
    try:
        # Lazy: parses the header only, so the size check below runs before any pixel is decoded.
        opened = Image.open(stream, formats=formats)
    except UnidentifiedImageError as exc:
        raise ImageError(name, f"not a recognised image (accepted formats: {', '.join(formats)})") from exc
    with opened:
        if declared_mime is not None:
            actual_mime = Image.MIME.get(opened.format or "", "")
            if actual_mime and actual_mime != declared_mime:
                # Mislabelled data URLs are common (e.g. a PNG sent as image/jpeg); the content decides.
                logger.debug("%s: data URL says %s but the content is %s", name, declared_mime, actual_mime)
        return _finish(opened, name=name, max_pixels=max_pixels, exif_transpose=exif_transpose)


def _available_formats() -> tuple[str, ...]:
    """ACCEPTED_FORMATS that this Pillow can open (Image.open raises KeyError for unregistered ones)."""
    Image.init()  # registers every plugin once; a no-op afterwards
    return tuple(fmt for fmt in ACCEPTED_FORMATS if fmt in Image.OPEN)


def _looks_like_svg(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!--", b"<!doctype svg"))
                                        and b"<svg" in text)


# --- decoding and mode conversion ------------------------------------------------------------------


def _finish(image: Image.Image, *, name: str, max_pixels: int | None, exif_transpose: bool) -> Image.Image:
    """Size-check, decode frame 0, optionally EXIF-transpose, convert to a detached RGB image."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(name, f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            name, f"image is too large: {width}x{height} = {width * height} pixels exceeds the limit of "
                  f"{max_pixels} pixels"
        )
    # A freshly opened file sits on frame 0 (the first frame of GIF/WebP/APNG/TIFF); a PIL image passed
    # in by the caller is used at whatever frame it is on.
    image.load()  # decode now, so truncated or corrupt data fails here and not downstream
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_MODES:
        image = _to_8bit(image)
    # convert() always returns a new image, detached from the file and from the caller's image.
    return image.convert("RGB")


_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a single-channel high-bit-depth image to mode "L" (rules in `load_image`'s docstring)."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray(_scale_16_to_8(values))
    if image.mode == "I":
        if values.size == 0 or (values.min() >= 0 and values.max() <= 255):
            return Image.fromarray(values.astype(np.uint8))
        if values.min() >= 0 and values.max() <= 65535:
            return Image.fromarray(_scale_16_to_8(values))
        low, span = int(values.min()), int(values.max()) - int(values.min())
        # round((v - low) * 255 / span), half up, in exact integer arithmetic
        stretched = ((values.astype(np.int64) - low) * 510 + span) // (2 * span)
        return Image.fromarray(stretched.astype(np.uint8))
    # mode "F"
    floats = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if floats.size and floats.max() <= 1.0:
        floats = floats * 255.0
    return Image.fromarray(np.floor(np.clip(floats, 0.0, 255.0) + 0.5).astype(np.uint8))


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """uint16-range integers → uint8 as round(v / 257) (exact integer arithmetic, 65535 → 255)."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)
