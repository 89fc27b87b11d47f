"""Image file checks and the one conversion every stored image goes through.

Stored images are resized to ``image_size`` square (like the report's ``Resize((256, 256))``) and
JPEG-encoded once at pack time: decoding a 256x256 JPEG is several times cheaper than decoding
the 600x450 original and resizing it every epoch (see ``bench/data_loading.py``), and training
never needs the originals.

Every site that decodes an image (packing, ``--images`` judging, the training loader, previews, the judge's
reads of samples) opens it through :func:`open_image`: only the formats it accepts (JPEG, PNG) are even
identified, so a file of any other format is refused by its first bytes and never reaches another PIL
plugin (EPS would start Ghostscript); animated or multi-frame files (APNG, MPO) are refused rather than
silently reduced to their first frame; nothing is decoded after a check failed.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
ACCEPTED_FORMATS = ("JPEG", "PNG")
"""The only image formats lesion-vq decodes (PIL format names); IMAGE_SUFFIXES are their file names."""

MAX_PIXELS = 120_000_000
"""Decompression-bomb guard: larger images are refused before their pixels are decoded (ISIC 2019's
largest are about 24 MP; PIL's own default warning threshold is 89 MP)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ImageRejected(ValueError):
    """An input image that cannot be used; the message is the reason recorded in the manifest."""


def key_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot be a webdataset ``__key__`` (None when it can).

    webdataset splits member names at the first dot into key and extension and treats '/' as a
    path, so ids with dots, slashes or '..' would silently merge or split samples.
    """
    if not image_id or image_id.strip() != image_id:
        return f"id {image_id!r} is empty or has leading/trailing whitespace"
    for bad in ("/", "\\", "..", "."):
        if bad in image_id:
            return f"id {image_id!r} contains {bad!r}, which breaks webdataset key grouping"
    if image_id.startswith("__") or _CONTROL.search(image_id):
        return f"id {image_id!r} starts with '__' or has control characters (reserved by webdataset)"
    if not image_id.isascii():
        try:
            image_id.encode("utf-8")
        except UnicodeEncodeError:  # a file name with bytes that are not UTF-8: no JSON or tar key can hold it
            return f"id {image_id!r} holds bytes that are not UTF-8; rename the file"
    return None


_SIGNATURES = ((b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"RIFF", "RIFF (WebP?)"),
               (b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
               (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"%PDF", "PDF"),
               (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"))


def _sniffed(data: bytes) -> str:
    """What the first bytes look like, for the message only (never used to choose a decoder)."""
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), "an unrecognised format")


def open_image(data: bytes, where: str, formats: tuple[str, ...] = ACCEPTED_FORMATS) -> Image.Image:
    """Image bytes opened (header read, no pixel decoded) as one of ``formats``, or ImageRejected naming
    ``where`` and the reason: empty, another format (only ``formats``' PIL plugins are asked, so no other
    plugin ever parses the bytes: PIL's EPS plugin would run Ghostscript on them), several frames (APNG,
    MPO: one frame of several is not the image), or more than MAX_PIXELS (checked from the header)."""
    if not data:
        raise ImageRejected(f"{where}: zero-byte file")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        raise ImageRejected(f"{where}: cannot decode: not a {' or '.join(formats)} image (its first bytes look like "
                            f"{_sniffed(data)}); only {', '.join(formats)} files are accepted") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageRejected(f"{where}: cannot decode image header ({type(err).__name__}: {err})") from None
    if getattr(img, "n_frames", 1) != 1 or getattr(img, "is_animated", False):
        raise ImageRejected(f"{where}: {img.format} with {getattr(img, 'n_frames', '?')} frames (animated or "
                            "multi-frame); only single-frame images are accepted")
    if img.format not in formats:  # a plugin's factory may hand over another image class (JPEG -> MPO)
        raise ImageRejected(f"{where}: {img.format} image; only {', '.join(formats)} files are accepted")
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageRejected(f"{where}: {width}x{height} = {width * height} pixels exceeds the "
                            f"decompression-bomb limit of {MAX_PIXELS}")
    return img


def decode_rgb(data: bytes, where: str, formats: tuple[str, ...] = ACCEPTED_FORMATS) -> Image.Image:
    """:func:`open_image`, fully decoded and converted to 8-bit RGB by :func:`to_rgb` (for images lesion-vq
    wrote itself: packed JPEGs, sample PNGs)."""
    img = open_image(data, where, formats)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected(f"{where}: cannot decode image ({type(err).__name__}: {err})") from None
    return to_rgb(img, where)


def load_rgb(data: bytes, where: str) -> tuple[Image.Image, str, str]:
    """Fully decode image bytes to 8-bit RGB; returns (image, source format such as "JPEG" or "PNG", source
    pixel format such as "RGB" or "I;16"). Raises ImageRejected naming ``where`` and the reason."""
    img = open_image(data, where)
    fmt = str(img.format)
    try:
        img.load()  # full decode: truncated / corrupt data fails here, not during training
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageRejected(f"{where}: cannot decode image ({type(err).__name__}: {err})") from None
    return to_rgb(img, where), fmt, img.mode


_ALPHA = frozenset({"P", "PA", "LA", "La", "RGBA", "RGBa"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
SUPPORTED_MODES = ("RGB", "L", "1", "YCbCr", "CMYK", *sorted(_ALPHA), *sorted(_SIXTEEN_BIT))


def to_rgb(img: Image.Image, where: str) -> Image.Image:
    """8-bit RGB by an explicit rule per pixel format; any other format is refused naming it.

    PIL's ``convert("RGB")`` alone is not faithful for every mode: it clips 16-bit values at 255 (a
    16-bit image becomes almost white) and drops alpha, leaving whatever colour transparent pixels hold.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1", "YCbCr", "CMYK"):
        # Grey replicated (bilevel as 0/255); YCbCr by the JPEG equations; CMYK by R = 255 - C - K etc.
        # (PIL's formula; JPEG's inverted Adobe CMYK is already undone by PIL's decoder).
        return img.convert("RGB")
    if mode in _ALPHA:  # palette (with or without transparency), grey or colour plus alpha
        rgba = img.convert("RGBA")
        # Composited over black, the dermoscope's surround: transparent pixels keep no hidden colour.
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if mode in _SIXTEEN_BIT:
        values = np.asarray(img)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 0xFFFF:
            raise ImageRejected(f"{where}: pixel format {mode!r} holds values {low}..{high}, outside the 16-bit "
                                "range 0..65535 it is read as; cannot be scaled to 8 bits faithfully")
        # v * 255 / 65535 rounded (= v / 257): the full 16-bit range onto 0..255, never clipped.
        scaled = (values.astype(np.uint32) * 255 + 0x7FFF) // 0xFFFF
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    raise ImageRejected(f"{where}: pixel format {mode!r} has no faithful conversion to 8-bit RGB "
                        f"(supported: {', '.join(SUPPORTED_MODES)})")


def resized(img: Image.Image, size: int) -> Image.Image:
    """``img`` at size x size, bilinear, aspect not kept (as in the report): how packing and the tokenizer API
    (vqvae/api.py) size every image."""
    return img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)


def to_stored_jpeg(img: Image.Image, size: int, quality: int) -> bytes:
    """Resize to size x size (:func:`resized`) and encode as JPEG."""
    buf = io.BytesIO()
    resized(img, size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def array_to_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read_image_file(path: Path, size: int, quality: int) -> tuple[bytes, dict[str, object]]:
    """Verify, convert and re-encode one source image; returns (jpeg bytes, facts for the metadata)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageRejected(f"{path}: unreadable ({err.strerror or err})") from None
    img, fmt, mode = load_rgb(data, str(path))
    return to_stored_jpeg(img, size, quality), {"original_size": list(img.size), "original_format": fmt,
                                                "original_mode": mode}
