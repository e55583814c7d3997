"""The frozen encoder: a small adapter around a timm trunk (after open_clip's timm_model.py).

`FrozenEncoder(images) -> (global, spatial)`:
  - global:  (B, D)    ResNet/EfficientNet pooled feature, ViT CLS token;
  - spatial: (B, T, D) CNN grid flattened row-major (T = h*w), ViT patch tokens without CLS/register tokens.
`grid` is (h, w) of the spatial tokens, so decoders can add 2-D position information.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .spec import EncoderSpec
from .transforms import build_transform
from .weights import create_trunk

log = logging.getLogger(__name__)


class FrozenEncoder(nn.Module):
    """timm trunk -> (global vector, spatial tokens). Frozen: eval mode, no grads, ever."""

    def __init__(self, spec: EncoderSpec, trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk if trunk is not None else create_trunk(spec)
        self.is_vit = hasattr(self.trunk, "patch_embed")
        self.num_prefix_tokens = getattr(self.trunk, "num_prefix_tokens", 0)
        self.dim = self.trunk.num_features
        with torch.inference_mode():
            probe = self.trunk.forward_features(torch.zeros(1, 3, spec.input_size, spec.input_size))
        self.grid = tuple(self.trunk.patch_embed.grid_size) if self.is_vit else tuple(probe.shape[-2:])
        if not self.is_vit:
            self.trunk.to(memory_format=torch.channels_last)  # CPU convolutions run faster channels-last

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # BatchNorm statistics and dropout stay frozen

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_vit:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.trunk.forward_features(images)
        pooled = self.trunk.forward_head(feats, pre_logits=True)
        if self.is_vit:
            spatial = feats[:, self.num_prefix_tokens:]
        else:
            spatial = feats.flatten(2).transpose(1, 2)
        return pooled, spatial

    def transform(self):
        return build_transform(self.trunk, self.spec)
