"""Image files: one decoder for training, evaluation and detection, and a header-only size probe.

``load_rgb(path)`` decodes a file into an upright RGB PIL image: the EXIF orientation tag is
applied (phone photos are stored sideways with a tag saying so; darknet's decoder ignores it, a
photo viewer and every labelling tool that shows the photo upright apply it), then any mode
becomes RGB. ``probe_image(path)`` returns the size ``load_rgb`` would give, after orientation,
from the header alone, so a dataset scan can normalise boxes without decoding.

Bad files raise :class:`UnreadableImage` (a ``ValueError`` naming the file and the reason):
missing, empty, not an image, undecodable, or over PIL's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 Mpixels by default). Such huge images are refused, not
read: below the limit an image takes at most 268 MB as RGB bytes (about 1.1 GB as the float32
tensor a transform makes of it), above it the memory per data worker is unbounded. A file that
ends early (a truncated download) is decoded as far as its data goes, as darknet's and OpenCV's
decoders do, and ``load_rgb`` says so in its second return value.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "UnreadableImage", "load_rgb", "probe_image", "to_rgb"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # looked up in this order, any case
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (the EXIF 2.3 table)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = (5, 6, 7, 8)
# what PIL raises for a file it cannot decode (struct.error and friends surface as these)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError)


class UnreadableImage(ValueError):
    """The file cannot be used as an image; ``reason`` says why, the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8, 1 = upright) as read from the header."""
    # PNG's getexif() decodes the whole file when no eXIf chunk precedes the pixels: such a
    # late tag is ignored, by the probe and the decoder alike
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    value = image.getexif().get(_ORIENTATION_TAG, 1)
    return value if value in _UPRIGHT else 1


def _check_pixels(path: str | os.PathLike, width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise UnreadableImage(
            path,
            f"too large: {width}x{height} = {width * height / 1e6:.0f} Mpixels is over PIL's "
            f"decompression-bomb limit of {limit / 1e6:.0f} Mpixels (decoding it would take "
            f"{3 * width * height / 2**30:.1f} GiB); downscale the image",
        )


@contextmanager
def _open(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open`` with every failure turned into :class:`UnreadableImage`."""
    try:
        empty = os.path.getsize(path) == 0
        with warnings.catch_warnings():  # over the limit: refused below, with its size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = None if empty else Image.open(path)
    except FileNotFoundError:
        raise UnreadableImage(path, "missing image") from None
    except Image.DecompressionBombError as error:
        raise UnreadableImage(path, f"too large: {error}; downscale the image") from None
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image (no image format recognises it)") from None
    except _DECODE_ERRORS as error:
        raise UnreadableImage(path, f"not an image ({type(error).__name__}: {error})") from None
    if image is None:
        raise UnreadableImage(path, "empty image file (0 bytes)")
    with image:
        _check_pixels(path, *image.size)
        yield image


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the upright image, from the header; raises UnreadableImage."""
    with _open(path) as image:
        width, height = image.size
        return (height, width) if _orientation(image) in _SWAPS_SIDES else (width, height)


@contextmanager
def _truncated_files_allowed() -> Iterator[None]:
    """PIL decodes a file that ends early as far as it goes, for this block only.

    PIL reads the flag from its module, so a thread decoding at the same moment would accept a
    truncated file too (DataLoader workers are processes, each with its own flag)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def load_rgb(path: str | os.PathLike) -> tuple[Image.Image, bool]:
    """Decode ``path`` now: ``(image, truncated)``, image upright (EXIF) and RGB.

    ``truncated`` is True when the data ended early: the image is what the data held, the rest
    filled in by the decoder. Raises :class:`UnreadableImage` for a file that does not decode.
    """
    with _open(path) as image:
        orientation = _orientation(image)
        truncated = False
        try:
            image.load()
        except _DECODE_ERRORS:
            truncated = True
        if truncated:
            # a fresh handle: PIL's decoder state after the failure is not reusable
            with Image.open(path) as retry, _truncated_files_allowed():
                try:
                    retry.load()
                except _DECODE_ERRORS as error:
                    reason = f"does not decode ({type(error).__name__}: {error})"
                    raise UnreadableImage(path, reason) from None
                image = retry
        if orientation in _UPRIGHT:
            image = image.transpose(_UPRIGHT[orientation])
        return to_rgb(image), truncated


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (grey, CMYK, RGBA, palette, 16-bit grey, ...)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA") and (image.mode == "PA" or "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)  # [H, W]
        top = 65535.0 if image.mode.startswith("I;16") else max(values.max(), 255.0)
        grey = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")
