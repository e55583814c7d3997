"""Dropout with a cheaper random mask, for CPU training.

`nn.Dropout` draws one Bernoulli sample per element; on CPU that draw dominated the transformer's training step
(the torch profiler of a batch-64 step on 2 cores: `aten::bernoulli_` 21 % of the time, more than every matmul
but one). Here 8 mask bytes come out of one 64-bit random integer and an element is kept when its byte is at or
above round(p * 256): the drop rate is p rounded to 1/256 (0.1 -> 0.1016), and kept values are scaled by the
exact inverse of the keep rate, so the expectation is unchanged as with `nn.Dropout`. On CUDA `nn.Dropout`'s
fused kernel is already fast and is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def byte_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Drop each element with probability ~p (rounded to 1/256) and rescale the rest; identity when not training."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    threshold = round(p * 256)
    if threshold >= 256:
        return torch.zeros_like(x)
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64)
    keep = words.view(torch.uint8)[:n].view(x.shape) >= threshold
    # A product with the scaled mask, not torch.where(keep, x * scale, 0): forward + backward of a (65, 21, 512)
    # activation measured 2.1 vs 4.5 ms in fp32, 1.2 vs 3.3 ms in bf16.
    return x * (keep.to(x.dtype) * (256.0 / (256 - threshold)))


class ByteDropout(nn.Module):
    """`nn.Dropout` with `byte_dropout`'s cheaper mask on CPU."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return byte_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
