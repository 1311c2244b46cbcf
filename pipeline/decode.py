"""Decoding one image, and what counts as an image that cannot be read: the
one definition every loader backend, `iecl validate` and `iecl convert` share.

An image is readable when PIL decodes all of it (a header check misses a
truncated or corrupt body) and it is in a format every backend decodes (DALI's
decoders read fewer formats than PIL). Its size is the size after its EXIF
orientation is applied, which every backend does (DALI's decoders by default,
PIL here), so crop boxes are drawn on the pixels actually decoded.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

# What PIL raises for files it cannot decode: unknown format, truncated data,
# decompression bombs, corrupt headers.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
#: Formats (PIL's names) that PIL, DALI's decoders and FFCV's conversion all read.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"})
#: EXIF orientations (tag 0x0112) that turn the image by 90 degrees: width and height swap.
_TRANSPOSED = frozenset({5, 6, 7, 8})


def describe(err: Exception) -> str:
    """One line on why an image failed (PIL's own message names a BytesIO object)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image in a format PIL knows"
    return f"{type(err).__name__}: {err}"


def _check_format(img: Image.Image) -> None:
    if img.format not in SUPPORTED_FORMATS:
        raise ValueError(f"{img.format} images are not decoded by every backend (use JPEG or PNG)")
    if img.width < 1 or img.height < 1:
        raise ValueError("empty image")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully (so truncation is caught here, not later), turn upright by
    its EXIF orientation and convert to RGB."""
    with Image.open(io.BytesIO(data)) as img:
        _check_format(img)
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


def inspect_image(data: bytes) -> tuple[int, int]:
    """(width, height) as decoded and turned upright, after a full decode; one
    of `DECODE_ERRORS` if the image is not readable (the shared decision)."""
    with Image.open(io.BytesIO(data)) as img:
        _check_format(img)
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        width, height = img.size
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def decode_error(data: bytes) -> str | None:
    """None if `data` is a readable image (`inspect_image`), else why not (one line)."""
    try:
        inspect_image(data)
    except DECODE_ERRORS as err:
        return describe(err)
    return None
