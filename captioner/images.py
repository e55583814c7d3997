"""Reading images as users have them: any size, grayscale, RGBA, palette, EXIF-rotated, JPEG/PNG/WebP.

One function, used by feature extraction and by captioning new images, so both see the same pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

# A 10000x10000 photo is legitimate (≈100 MP); PIL's default bomb limit (≈89 MP) would refuse it. Beyond this we
# refuse: a decompression bomb should not be able to take the machine's memory.
MAX_PIXELS = 20_000 * 20_000


class ImageReadError(RuntimeError):
    """An image file cannot be used; the message names the file and why."""


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)  # phone photos are stored sideways with an EXIF rotation flag
                im.load()
                return to_rgb(im)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError ...
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (not black, which is what a plain convert gives)."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")
