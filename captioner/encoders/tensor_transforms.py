"""The per-image geometric stage of an evaluation transform (resize, centre crop, letterbox) as tensor ops, for
images decoded on the extraction device (`features.decode=device`, captioner.features.extract).

`tensor_geometry(image_stage)` is built from the PIL stage of `split_transform` itself, reading each step's sizes,
interpolation and fill, so the two paths cannot drift apart; a step it cannot mirror makes it return None, and that
encoder keeps the PIL path. The output is close to the PIL path's, not bit-identical: torch's antialiased resize
uses PIL's filters but computes in float32 and rounds once (tests/test_extract_decode.py measures the difference).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .transforms import _Letterbox, _ToUint8Tensor

# Resampling filters torch has on tensors, by the interpolation PIL uses. PIL's nearest neighbour samples pixel
# centres, which is torch's "nearest-exact" (its "nearest" is off by half a pixel).
_TENSOR_INTERPOLATION = {
    InterpolationMode.NEAREST: InterpolationMode.NEAREST_EXACT,
    InterpolationMode.NEAREST_EXACT: InterpolationMode.NEAREST_EXACT,
    InterpolationMode.BILINEAR: InterpolationMode.BILINEAR,
    InterpolationMode.BICUBIC: InterpolationMode.BICUBIC,
}


class TensorGeometry:
    """uint8 RGB image (3, H, W) on any device -> uint8 (3, S, S) on that device: the PIL stage's steps in order."""

    def __init__(self, steps: list[Callable[[torch.Tensor], torch.Tensor]], source: str) -> None:
        self.steps, self.source = steps, source

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise TypeError(f"expected a uint8 RGB image tensor (3, H, W), got {image.dtype} {tuple(image.shape)}")
        for step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(of {self.source})"


def tensor_geometry(image_stage) -> TensorGeometry | None:
    """The tensor twin of `image_stage` (the per-image stage of `split_transform`: PIL steps ending in
    `_ToUint8Tensor`), or None when one of its steps has no tensor twin here."""
    steps = list(getattr(image_stage, "transforms", [image_stage]))
    if not steps or not isinstance(steps[-1], _ToUint8Tensor):
        return None
    ops = [_tensor_step(step) for step in steps[:-1]]
    return None if any(op is None for op in ops) else TensorGeometry(ops, repr(image_stage))


def _tensor_step(step) -> Callable[[torch.Tensor], torch.Tensor] | None:
    # exact types: a subclass (timm's ResizeKeepRatio, say) may compute its size otherwise
    if type(step) is transforms.Resize:
        interpolation = _TENSOR_INTERPOLATION.get(step.interpolation)
        if interpolation is None:
            return None
        size = [step.size] if isinstance(step.size, int) else list(step.size)  # one number: the shorter side
        return functools.partial(_resize, size=size, interpolation=interpolation, max_size=step.max_size)
    if type(step) is transforms.CenterCrop:
        return functools.partial(F.center_crop, output_size=list(step.size))  # pads with 0 as PIL's does
    if type(step) is _Letterbox:
        from timm.data.transforms import str_to_interp_mode

        interpolation = _TENSOR_INTERPOLATION.get(str_to_interp_mode(step.interpolation))
        return None if interpolation is None else functools.partial(_letterbox, step, interpolation=interpolation)
    return None


# EXIF orientation -> the tensor op of the transpose ImageOps.exif_transpose makes (PIL's ROTATE_90 turns
# counter-clockwise, as rot90 with k=1 over (H, W) does)
_EXIF_TRANSPOSES: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(-1),                           # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),                       # ROTATE_180
    4: lambda x: x.flip(-2),                           # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),                  # TRANSPOSE
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),    # ROTATE_270
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),     # TRANSVERSE
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),     # ROTATE_90
}


def exif_transpose(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """An image (C, H, W) stored with EXIF `orientation` as it is shown: what ImageOps.exif_transpose does to a PIL
    image (any other value, 1 included, leaves it as it is). decode_jpeg applies the orientation only on CPU, so the
    device path reads it from the header and applies it here, on every device alike."""
    transpose = _EXIF_TRANSPOSES.get(orientation)
    return image if transpose is None else transpose(image)


def _resize(image: torch.Tensor, size: list[int], interpolation: InterpolationMode,
            max_size: int | None = None) -> torch.Tensor:
    # antialias always: PIL always filters over the whole footprint when shrinking; uint8 in, uint8 out (torchvision
    # clamps and rounds a bicubic result)
    return F.resize(image, size, interpolation=interpolation, max_size=max_size, antialias=True)


def _letterbox(step: _Letterbox, image: torch.Tensor, interpolation: InterpolationMode) -> torch.Tensor:
    """`_Letterbox` on a tensor: the same layout (`step.layout`), the same fill, the same clipping as PIL's paste."""
    height, width = image.shape[-2:]
    new_w, new_h, left, top = step.layout(width, height)
    resized = _resize(image, [new_h, new_w], interpolation)
    fill = torch.tensor(step.fill, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    canvas = fill.expand(image.shape[0], step.size, step.size).clone()
    x0, y0 = max(left, 0), max(top, 0)  # a resized image larger than the canvas (crop_pct < 1) is cut to it
    x1, y1 = min(left + new_w, step.size), min(top + new_h, step.size)
    canvas[:, y0:y1, x0:x1] = resized[:, y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas
