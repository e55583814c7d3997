"""How an image becomes the encoder's input tensor: the evaluation transform of a spec, and its split into a
per-image stage (in loader workers) and a batch stage (beside the encoder).

How an image becomes a square input (`encoder.resize`):
  - `squash`  the whole image resized to input_size x input_size, aspect ratio not kept (Show-Attend-Tell);
  - `crop`    shorter side to input_size / crop_pct, then a centre crop: the longer side's ends are cut off;
  - `pad`     longer side to input_size / crop_pct keeping the aspect ratio, the rest padded with the
              normalisation mean colour (zero after Normalize), centred.
A `crop_pct` under 1 keeps only that central fraction of the resized image, in every mode (timm's meaning).
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import timm
import torch
from torch import nn
from torchvision import transforms

from .spec import EncoderSpec

log = logging.getLogger(__name__)


def spec_transform(spec: EncoderSpec):
    """The evaluation transform of `spec` without loading any weights (cheap: used to compute cache keys)."""
    return build_transform(timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs()), spec)


def build_transform(trunk: nn.Module, spec: EncoderSpec):
    """Evaluation transform resolved for the configured input size (not timm's 518 px default for DINOv2), with the
    model's interpolation, mean and std, resizing as `spec.resize` says; it ends in ToTensor + Normalize."""
    overrides = {"input_size": (3, spec.input_size, spec.input_size), "crop_pct": spec.crop_pct,
                 "crop_mode": {"squash": "squash", "crop": "center", "pad": "squash"}[spec.resize]}
    if spec.interpolation:
        overrides["interpolation"] = spec.interpolation
    cfg = timm.data.resolve_data_config(overrides, model=trunk)
    transform = timm.data.create_transform(**cfg, is_training=False)
    if spec.resize == "pad":
        # timm's own "border" mode would round a very thin image's short side to 0 px
        letterbox = _Letterbox(spec.input_size, math.floor(spec.input_size / spec.crop_pct),
                               cfg["interpolation"], tuple(round(255 * m) for m in cfg["mean"]))
        transform.transforms[:-2] = [letterbox]
    return transform


class _Letterbox:
    """RGB PIL image -> `size` x `size`: the longer side resized to `scale` keeping the aspect ratio, centred on a
    canvas of `fill` (the mean colour, zero after Normalize); a `scale` over `size` crops the centre."""

    def __init__(self, size: int, scale: int, interpolation: str, fill: tuple[int, ...]) -> None:
        self.size, self.scale, self.interpolation, self.fill = size, scale, interpolation, fill

    def layout(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, left, top) of an image of that size on the canvas (left/top < 0: its
        centre is cut out); shared with the tensor path (captioner.encoders.tensor_transforms) so both agree."""
        ratio = self.scale / max(width, height)
        new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        return new_w, new_h, (self.size - new_w) // 2, (self.size - new_h) // 2

    def __call__(self, image):
        from PIL import Image
        from timm.data.transforms import str_to_pil_interp

        new_w, new_h, left, top = self.layout(*image.size)
        resized = image.resize((new_w, new_h), str_to_pil_interp(self.interpolation))
        canvas = Image.new(image.mode, (self.size, self.size), self.fill)
        canvas.paste(resized, (left, top))
        return canvas

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, interpolation={self.interpolation}, "
                f"fill={self.fill})")


class _ToUint8Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W): ToTensor without its float conversion."""

    def __call__(self, image) -> torch.Tensor:
        if getattr(image, "mode", None) != "RGB":
            raise TypeError(f"expected an RGB PIL image (captioner.images.load_image gives one), got {image!r}")
        return torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NormaliseBatch:
    """uint8 images (B, 3, H, W) -> float32 (x / 255 - mean) / std: ToTensor + Normalize on a whole batch, with the
    same float32 operations in the same order as torchvision's (to_tensor's div(255), normalize's sub_ and div_), so
    on CPU the result is bit-identical to transforming image by image (on CUDA, torch may divide by a scalar as a
    multiplication by its reciprocal: within an ulp)."""

    def __init__(self, mean, std) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        if images.device.type != "cpu":
            return images.to(torch.float32).div_(255).sub_(mean).div_(std)
        # On CPU image by image, so that each image's float copy stays in cache across the three passes.
        out = torch.empty(images.shape, dtype=torch.float32)
        for image, x in zip(images, out):
            torch.div(image, 255, out=x).sub_(mean).div_(std)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def split_transform(transform) -> tuple[object, NormaliseBatch | None]:
    """An evaluation transform as (per-image stage, batch stage): the per-image stage keeps the PIL steps (resize,
    crop) and ends in a uint8 tensor; the batch stage converts and normalises a stacked batch (`NormaliseBatch`).

    Why: loader workers then do half the work per image and ship uint8 (4x fewer bytes), and beside a GPU the batch
    stage runs on the device. A transform that does not end in ToTensor + Normalize is returned whole, with no
    batch stage.
    """
    steps = list(getattr(transform, "transforms", []))
    if (len(steps) >= 2 and isinstance(steps[-2], transforms.ToTensor)
            and isinstance(steps[-1], transforms.Normalize) and not steps[-1].inplace):
        return transforms.Compose([*steps[:-2], _ToUint8Tensor()]), NormaliseBatch(steps[-1].mean, steps[-1].std)
    return transform, None


def transform_signature(transform) -> str:
    """A short hash of the transform's printed form: part of the feature-cache key."""
    return hashlib.sha256(repr(transform).encode()).hexdigest()[:12]
