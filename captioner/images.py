"""Reading images as users have them: any size, grayscale, RGBA, palette, EXIF-rotated, JPEG/PNG/WebP.

One function, used by feature extraction and by captioning new images, so both see the same pixels.

What can go wrong with a user's file, and what happens (tests/test_reliability.py has one test for each):
  - missing, empty (0 bytes), not an image (a text file named .jpg), truncated or corrupt: `ImageReadError`
    whose message names the file and the problem; feature extraction skips and counts such images;
  - transparency (RGBA/LA/PA, palette with a transparent colour): composited on white, not black;
  - tiny (1x1) images: used as they are (the encoder's transform resizes them);
  - huge images (a 10000x10000 scan is legitimate): used, but shrunk while decoding so one image never costs
    more than its decoded size once: JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself, other formats
    are box-reduced by an integer factor right after decoding, before any colour conversion copies them;
  - more than MAX_PIXELS pixels: refused before decoding (a decompression bomb must not take the machine's memory).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from PIL import Image, ImageOps

# A 10000x10000 photo is legitimate (100 MP); PIL's default bomb limit (89 MP, error only at twice that) would
# refuse it. We enforce our own limit exactly (PIL's limit is only raised so that it never fires first).
MAX_PIXELS = 20_000 * 20_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Images whose longer side exceeds this are shrunk by an integer factor while decoding. The encoders look at 224
# (at most 518) pixels, so nothing they could see is lost, while memory per image stays below ~64 MB (RGBA).
MAX_DECODE_SIDE = 4096
# Image.reduce works on these modes; palette and 1-bit images must be converted first (averaging palette indices
# would give nonsense colours).
_REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"}


class ImageReadError(RuntimeError):
    """An image file cannot be used; the message names the file and why."""


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file (0 bytes); re-copy it from the original dataset or remove it")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise ImageReadError(
                        f"{path}: {width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit "
                        "(captioner.images.MAX_PIXELS); downscale the image to use it")
                factor = _shrink_factor(im.size)
                if factor > 1:
                    # JPEG only (a no-op elsewhere): libjpeg decodes straight at the largest 1/2^k scale that is
                    # not smaller than the target, so the full-size image never exists in memory.
                    im.draft(im.mode, (width // factor, height // factor))
                im.load()
                im = _shrink(im)
                im = ImageOps.exif_transpose(im)  # phone photos are stored sideways with an EXIF rotation flag
                return to_rgb(im)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found; check the dataset root and image folder, or restore the "
                             "file") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError ...
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e}); re-copy it from the "
                             "original dataset or remove it") from None


def _shrink_factor(size: tuple[int, int]) -> int:
    """The smallest integer factor that brings the longer side to MAX_DECODE_SIDE or below (1: keep)."""
    return max(1, math.ceil(max(size) / MAX_DECODE_SIDE))


def _shrink(im: Image.Image) -> Image.Image:
    factor = _shrink_factor(im.size)  # after a JPEG draft only the remaining factor is left
    if factor == 1:
        return im
    if im.mode not in _REDUCIBLE_MODES:
        im = to_rgb(im)
    return im.reduce(factor)  # box filter: every source pixel counts, no aliasing


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (not black, which is what a plain convert gives)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")
