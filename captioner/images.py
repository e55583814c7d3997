"""Reading images as users have them: any size, grayscale, RGBA, palette, EXIF-rotated, JPEG/PNG/WebP.

One function, used by feature extraction and by captioning new images, so both see the same pixels.

What can go wrong with a user's file, and what happens (tests/test_reliability.py has one test for each):
  - missing, empty (0 bytes), not an image (a text file named .jpg), truncated or corrupt: `ImageReadError`
    whose message names the file and the problem; feature extraction skips and counts such images;
  - transparency (RGBA/LA/PA, a transparent colour in a palette, grey, RGB or 16-bit image): composited on
    white, not black;
  - every other mode and bit depth becomes the RGB it shows (`to_rgb`): 16-bit images (I;16, I;16B, 16-bit
    PNG/TIFF) are scaled to 8 bits (a plain convert clips them to white), float images (F) in [0, 1] are scaled by
    255, CIE L*a*b* is converted to sRGB (D65), CMYK/YCbCr/HSV by their standard formulas; an animated GIF/WebP
    or a multi-page TIFF gives its first frame;
  - a file that cannot be opened for lack of permission: `ImageReadError` saying so (skipped and counted);
  - tiny (1x1) images: used as they are (the encoder's transform resizes them);
  - huge images (a 10000x10000 scan is legitimate): used, but shrunk while decoding so one image never costs
    more than its decoded size once: JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself, other formats
    are box-reduced by an integer factor right after decoding, before any colour conversion copies them;
  - more than MAX_PIXELS (200 M) pixels: refused before decoding (a decompression bomb must not take the machine's
    memory);
"""

from __future__ import annotations

import math
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

# A 10000x10000 photo is legitimate (100 MP); PIL's default bomb limit (89 MP, error only at twice that) would
# refuse it. We enforce our own limit exactly (PIL's limit is only raised so that it never fires first). Twice
# that photo is the most: a 20000x20000 PNG (400 MP, 1.2 GB decoded, formats other than JPEG cannot be decoded at a
# reduced size) would hold a web demo's memory and time.
MAX_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Images whose longer side exceeds this are shrunk by an integer factor while decoding. The encoders look at 224
# (at most 518) pixels, so nothing they could see is lost, while memory per image stays below ~64 MB (RGBA).
MAX_DECODE_SIDE = 4096
# Image.reduce works on these modes; palette and 1-bit images must be converted first (averaging palette indices
# would give nonsense colours).
_REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"}


class ImageReadError(UserError, RuntimeError):
    """An image file cannot be used; the message names the file and why."""


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a pipe would block the reader forever, a device never end
            raise ImageReadError(f"{path}: not a regular file (a folder, device or pipe); replace it by the image "
                                 "file or remove it from the dataset")
        if st.st_size == 0:
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
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied; make it readable (chmod a+r) or run as a user who may "
                             "read it") from None
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
        im = _eight_bit(im) if _is_sixteen_bit(im) else to_rgb(im)  # 16-bit: 1 byte a pixel, not 3, until reduced
    return im.reduce(factor)  # box filter: every source pixel counts, no aliasing


def to_rgb(im: Image.Image) -> Image.Image:
    """The RGB image `im` shows, whatever its mode and bit depth; transparent pixels become white (not black,
    which is what a plain convert gives)."""
    im = _eight_bit(im)
    if _has_transparency(im):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    if im.mode == "LAB":
        return _lab_to_srgb(im)
    return im.convert("RGB")


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in im.info


# -- more than 8 bits a channel --------------------------------------------------------------------------------------

def _is_sixteen_bit(im: Image.Image) -> bool:
    return im.mode.startswith("I;16")


def _eight_bit(im: Image.Image) -> Image.Image:
    """Grey images of 16 or 32 bits or floats as 8-bit "L" (or "LA" when a value is marked transparent); other
    modes unchanged. PIL's own convert clips such values at 255, so a 16-bit photo would come out white."""
    if not (_is_sixteen_bit(im) or im.mode in ("I", "F")):
        return im
    values = np.asarray(im)
    grey = Image.fromarray(_scaled_to_eight_bit(values, im.mode))
    transparent = im.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        # compared at full depth: after scaling, neighbouring values would share the transparent one's byte
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (grey, alpha))
    return grey


def _scaled_to_eight_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """uint8 values of a 16-bit, 32-bit integer or float grey image.

    16-bit modes are scaled by 255/65535 (the file says its depth). Mode I (32-bit) and F (float) do not: values
    in 0..255 are taken as they are, I values up to 65535 as 16-bit (what PIL's convert("I") of a 16-bit image and
    older PIL's PNG reader give), F values in [0, 1] as fractions of white; any other range is stretched from its
    minimum to its maximum (NaN counts as black)."""
    if mode.startswith("I;16"):
        out = np.empty(values.shape, np.uint8)
        for top in range(0, len(values), 1024):  # in bands: a uint32 copy of a 100 MP image would take 400 MB
            out[top:top + 1024] = (values[top:top + 1024].astype(np.uint32) * 255 + 32767) // 65535
        return out
    values = np.nan_to_num(values.astype(np.float64), nan=0.0)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    elif low >= 0 and high <= 255:
        scaled = values
    elif mode == "I" and low >= 0 and high <= 65535:
        scaled = values * (255 / 65535)
    else:
        scaled = (values - low) * (255 / (high - low))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


# -- CIE L*a*b* -----------------------------------------------------------------------------------------------------

_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_XYZ_TO_LINEAR_SRGB = np.array([[3.2404542, -1.5371385, -0.4985314],
                                [-0.9692660, 1.8760108, 0.0415560],
                                [0.0556434, -0.2040259, 1.0572252]])


def _lab_to_srgb(im: Image.Image) -> Image.Image:
    """PIL's "LAB" to sRGB by the CIE formulas with a D65 white (PIL 13's own conversion turns sRGB blue into
    (88, 0, 253), and older versions have none). PIL keeps L* scaled to 0..255 and a*, b* as signed bytes (its
    getpixel shows them offset by 128)."""
    raw = np.ascontiguousarray(np.asarray(im))
    lightness = raw[..., 0] * (100 / 255)
    a, b = (raw[..., k].view(np.int8).astype(np.float64) for k in (1, 2))
    fy = (lightness + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _D65_WHITE
    linear = np.clip(xyz @ _XYZ_TO_LINEAR_SRGB.T, 0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return Image.fromarray(np.rint(srgb * 255).astype(np.uint8))
