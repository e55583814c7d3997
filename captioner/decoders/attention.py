"""Attention mechanisms a decoder attends with (conf/attention/): built by Hydra as a partial, then called by the
decoder once per attention layer as `attention(d_model=..., dropout=...)`.

An attention module maps queries `x` (N, n, d) and keys/values (B, heads, m, dh) from `keys_values(memory)` to
(N, n, d), and the attention weights (N, heads, n, m) when asked for (`need_weights`): N = G*B, G query rows sharing
one row of keys/values (the G beams of one image in beam search).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import ByteDropout, byte_dropout


def _split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, n, d) -> (B, heads, n, d/heads)"""
    B, n, d = x.shape
    return x.view(B, n, n_head, d // n_head).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, n, dh) -> (B, n, heads*dh)"""
    B, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(B, n, h * dh)


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries from `x` over keys/values computed (by `keys_values`) from any sequence."""

    def __init__(self, d_model: int, dropout: float, num_heads: int = 4) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.resid_drop = ByteDropout(dropout)

    def keys_values(self, x: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values of x (B, m, d), each (B, heads, m, dh); with `index`, of the rows x[index]."""
        kv = self.kv(x)
        if index is not None:  # rows of the contiguous projection: heads are split after the copy
            kv = kv.index_select(0, index)
        k, v = kv.chunk(2, dim=-1)
        return _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, causal: bool = False, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x (N, n, d), k/v (B, heads, m, dh) -> (N, n, d), and the weights (N, heads, n, m) if asked for.

        N = G*B: keys/values shared by G consecutive rows of x (the G beams of one image in beam search) are kept
        once; those rows' queries are stacked against them, G*n queries per image, so that beam search never
        attends over copies of the same keys."""
        q = _split_heads(self.q(x), self.num_heads)
        N, h, n, dh = q.shape
        B = k.shape[0]
        groups = N // B
        if groups * B != N or (groups > 1 and causal):
            raise ValueError(f"{N} query rows cannot share keys/values of {B} rows" + (" causally" if causal else ""))
        if groups > 1:
            q = q.view(B, groups, h, n, dh).transpose(1, 2).reshape(B, h, groups * n, dh)
        y, att = self._attend(q, k, v, causal, need_weights)
        if groups > 1:
            y = y.view(B, h, groups, n, dh).transpose(1, 2).reshape(N, h, n, dh)
            if att is not None:
                att = att.view(B, h, groups, n, -1).transpose(1, 2).reshape(N, h, n, -1)
        return self.resid_drop(self.out(_merge_heads(y))), att

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, need_weights: bool):
        p = self.dropout if self.training else 0.0
        if need_weights or (p > 0 and q.device.type == "cpu"):
            # The explicit form: SDPA never materialises the weights, which are wanted when visualising a decoded
            # caption; and with attention dropout on CPU, SDPA takes this same unfused path anyway but draws
            # its mask with the slow per-element Bernoulli (see dropout.py).
            scores = (q @ k.transpose(-2, -1)).float().mul(q.shape[-1] ** -0.5)
            if causal:
                n, m = scores.shape[-2:]
                future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(m - n + 1)
                scores = scores.masked_fill(future, float("-inf"))
            att = scores.softmax(dim=-1)
            y = byte_dropout(att, p).to(v.dtype) @ v
            att = att if need_weights else None
        else:
            y, att = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal), None
        return y, att
