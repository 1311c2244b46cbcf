"""Decoding one image, and what counts as an image that cannot be read: the
one definition every loader, `iecl validate` and `iecl convert` share."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

# What PIL raises for files it cannot decode: unknown format, truncated data,
# decompression bombs, corrupt headers.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def describe(err: Exception) -> str:
    """One line on why an image failed (PIL's own message names a BytesIO object)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image in a format PIL knows"
    return f"{type(err).__name__}: {err}"


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully (so truncation is caught here, not later) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def decode_error(data: bytes) -> str | None:
    """None if `data` decodes fully as an image, else why not (one line)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except DECODE_ERRORS as err:
        return describe(err)
    return None
