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


class SoftAttention(nn.Module):
    """Show, Attend and Tell's soft attention (additive, Bahdanau): e_i = w^T tanh(W_a a_i + W_h h), alpha =
    softmax_i(e), context = sum_i alpha_i a_i, with the interface of `MultiHeadAttention` (one head), so that it
    serves the Show-Attend-Tell decoder and every attention layer of the transformer alike.

    The values are the annotation vectors themselves, unprojected, as in the paper: the output has the width of
    the memory (d_model). `dropout` drops attention weights, as MultiHeadAttention's attention dropout does."""

    def __init__(self, d_model: int, dropout: float, attention_dim: int = 512) -> None:
        super().__init__()
        self.dropout, self.attention_dim = dropout, attention_dim
        self.key = nn.Linear(d_model, attention_dim)  # W_a, applied once per image
        self.query = nn.Linear(d_model, attention_dim)  # W_h
        self.score = nn.Linear(attention_dim, 1)  # w

    def keys_values(self, x: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys (B, 1, m, attention_dim) and values (B, 1, m, d) of x (B, m, d); with `index`, of the rows x[index]."""
        k = self.key(x)
        if index is not None:  # each distinct image projected once, then copied to its captions
            k, x = k.index_select(0, index), x.index_select(0, index)
        return k[:, None], x[:, None]

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, causal: bool = False, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x (N, n, d), k (B, 1, m, a), v (B, 1, m, d) -> (N, n, d), and the weights (N, 1, n, m) if asked for.

        N = G*B: G consecutive rows of x share one row of keys/values (the G beams of one image), their G*n queries
        stacked against it as in MultiHeadAttention."""
        N, n, _ = x.shape
        B, m = k.shape[0], k.shape[2]
        groups = N // B
        if groups * B != N or (groups > 1 and causal):
            raise ValueError(f"{N} query rows cannot share keys/values of {B} rows" + (" causally" if causal else ""))
        q = self.query(x).reshape(B, groups * n, 1, -1)  # rows b*G + g of x -> image b, queries g*n + i
        # (B, G*n, m): the additive score of every query against every key
        scores = self.score(torch.tanh(q + k[:, 0, None])).squeeze(-1).float()
        if causal:
            future = torch.ones(n, m, dtype=torch.bool, device=x.device).triu(m - n + 1)
            scores = scores.masked_fill(future, float("-inf"))
        att = scores.softmax(dim=-1)
        p = self.dropout if self.training else 0.0
        y = byte_dropout(att, p).to(v.dtype) @ v[:, 0]  # (B, G*n, d)
        weights = att.view(N, 1, n, m) if need_weights else None
        return y.view(N, n, -1), weights
