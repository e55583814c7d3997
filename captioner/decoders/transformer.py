"""Transformer captioner over the spatial feature grid: a small encoder on the image tokens, a causal decoder
with cross-attention to them (the attention variant; `feature = "spatial"`).

  image tokens (B, T=h*w, D) -> LayerNorm -> Linear -> + row/column position -> pre-norm self-attention blocks
                             -> LayerNorm = memory (B, T, d)
  words (B, n) -> embedding + position -> pre-norm [causal self-attention, cross-attention to memory, MLP] blocks
               -> LayerNorm -> Linear head -> logits (B, n, V)

The 2-D position embedding is what lets the model answer "is the red circle left of the blue square": without
it the encoder and the cross-attention are permutation invariant over the grid and "left of" is unlearnable.

The attention mechanism is a component (conf/attention/, `attention=` a factory called once per attention layer);
the multi-head one is written out (rather than nn.MultiheadAttention) so that step-wise decoding can keep a KV
cache and return the last layer's cross-attention weights for visualisation. Step state, all batch-first so that generic
beam search can reorder it:
  tokens           (B, t)          the words fed so far (its length is the next position)
  cross_k.i/v.i    (B, heads, T, dh)  layer i's keys/values of the memory, projected once in `init_state`; one
                                   row per image even when the other entries hold G beams per image
  self_k.i/v.i     (B, heads, t, dh)  layer i's self-attention keys/values of the prefix (KV cache)
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from ..data.vocabulary import Vocabulary
from .attention import MultiHeadAttention
from .dropout import ByteDropout

# `attention(d_model=..., dropout=...)` -> an attention module (captioner.decoders.attention).
AttentionFactory = Callable[..., nn.Module]


class MLP(nn.Sequential):
    def __init__(self, d_model: int, ff_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Linear(ff_dim, d_model), ByteDropout(dropout))


class EncoderBlock(nn.Module):
    """Pre-norm self-attention over the image tokens (every token sees every token) + MLP."""

    def __init__(self, d_model: int, attention: AttentionFactory, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d_model), attention(d_model=d_model, dropout=dropout)
        self.ln2, self.mlp = nn.LayerNorm(d_model), MLP(d_model, ff_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, *self.attn.keys_values(h))[0]
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the image memory, MLP."""

    def __init__(self, d_model: int, attention: AttentionFactory, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(d_model), attention(d_model=d_model, dropout=dropout)
        self.ln2, self.cross_attn = nn.LayerNorm(d_model), attention(d_model=d_model, dropout=dropout)
        self.ln3, self.mlp = nn.LayerNorm(d_model), MLP(d_model, ff_dim, dropout)

    def forward(
        self,
        x: Tensor,
        cross_kv: tuple[Tensor, Tensor],
        past: tuple[Tensor, Tensor] | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
        """x (B, n, d) -> x, this layer's self-attention (k, v) including `past`, cross-attention weights.

        Without `past` (teacher forcing) the n positions attend causally among themselves. With `past` (one new
        position, step-wise decoding) the new position attends to the cached prefix and itself: no mask needed.
        """
        h = self.ln1(x)
        k, v = self.self_attn.keys_values(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.self_attn(h, k, v, causal=past is None)[0]
        y, att = self.cross_attn(self.ln2(x), *cross_kv, need_weights=need_weights)
        x = x + y
        return x + self.mlp(self.ln3(x)), (k, v), att


class TransformerDecoder(nn.Module):
    feature = "spatial"  # features are (B, T, D), T = h*w tokens of a row-major grid
    # State entries with one row per image, shared by all of its beams (see MultiHeadAttention.forward): beam search
    # neither expands nor reorders them.
    per_image_state = ("cross_k.", "cross_v.")

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        grid: tuple[int, int] = (7, 7),
        attention: AttentionFactory | None = partial(MultiHeadAttention, num_heads=4),
        d_model: int = 256,
        encoder_layers: int = 2,
        decoder_layers: int = 3,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        max_len: int = 64,
        position_std: float = 1.0,
    ) -> None:
        super().__init__()
        if decoder_layers < 1:
            raise ValueError("TransformerDecoder needs decoder_layers >= 1 (cross-attention is how it sees the image)")
        if attention is None:
            raise ValueError("TransformerDecoder needs an attention mechanism (attention=mha): cross-attention is how "
                             "it sees the image")
        self.vocab_size, self.feature_dim, self.max_len = vocab_size, feature_dim, max_len
        self.grid = (int(grid[0]), int(grid[1]))
        h, w = self.grid
        # image side
        self.feat_proj = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, d_model))
        self.row_pos = nn.Parameter(torch.zeros(h, d_model))
        self.col_pos = nn.Parameter(torch.zeros(w, d_model))
        self.encoder = nn.ModuleList(EncoderBlock(d_model, attention, ff_dim, dropout) for _ in range(encoder_layers))
        self.enc_ln = nn.LayerNorm(d_model)
        # word side
        self.tok_emb = nn.Embedding(vocab_size, d_model, padding_idx=Vocabulary.pad_id)
        self.pos_emb = nn.Parameter(torch.zeros(max_len, d_model))
        self.drop = ByteDropout(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, attention, ff_dim, dropout) for _ in range(decoder_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        # The grid's position tables start at the scale of the projected image content, not GPT-2's 0.02: smaller,
        # position drowns under content and cross-attention never learns to tell "left of" from "right of".
        for p in (self.row_pos, self.col_pos):
            nn.init.normal_(p, std=position_std)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # GPT-2 style small init: keeps the residual stream and the initial logits near zero (uniform output).
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            m.weight.data[Vocabulary.pad_id].zero_()

    # -- image side ----------------------------------------------------------------------------------------

    def memory(self, features: Tensor) -> Tensor:
        """Image tokens (B, T, D) -> encoded memory (B, T, d_model)."""
        h, w = self.grid
        if features.dim() != 3 or features.shape[1] != h * w:
            raise ValueError(
                f"TransformerDecoder expects spatial features (B, {h * w}, D) for grid {self.grid}, got "
                f"{tuple(features.shape)}; the grid must match the encoder's feature map"
            )
        # row r, column c -> token r*w + c: the same row-major order the encoders flatten their grids in.
        pos = (self.row_pos[:, None, :] + self.col_pos[None, :, :]).reshape(h * w, -1)
        x = self.drop(self.feat_proj(features) + pos)
        for block in self.encoder:
            x = block(x)
        return self.enc_ln(x)

    def _cross_kv(self, features: Tensor, image_index: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        memory = self.memory(features)
        # With `image_index`, each image is encoded and projected once however many of its captions are in the
        # batch, and its keys/values are copied to each caption (projecting after the copy did 5x the work).
        return [block.cross_attn.keys_values(memory, image_index) for block in self.blocks]

    # -- the decoder interface ------------------------------------------------------------------------------

    def forward(self, features: Tensor, captions: Tensor, image_index: Tensor | None = None,
                return_attention: bool = False):
        """Teacher forcing: (B, T, D), (B, L) -> logits (B, L-1, V); causal, so padding never leaks backwards.
        With `image_index` (B,), features hold U distinct images and caption b belongs to image image_index[b].
        With `return_attention`, also the last layer's cross-attention behind each position (B, L-1, T), averaged
        over heads (what an attention regulariser reads)."""
        inputs = captions[:, :-1]
        n = inputs.shape[1]
        if n > self.max_len:
            raise ValueError(f"captions of {n + 1} tokens exceed the decoder's max_len={self.max_len} (+1)")
        x = self.drop(self.tok_emb(inputs) + self.pos_emb[:n])
        att = None
        for i, (block, kv) in enumerate(zip(self.blocks, self._cross_kv(features, image_index))):
            want = return_attention and i == len(self.blocks) - 1
            x, _, a = block(x, kv, need_weights=want)
            att = a if want else att
        logits = self.head(self.ln_f(x))
        return (logits, att.mean(dim=1)) if return_attention else logits

    def init_state(self, features: Tensor) -> dict[str, Tensor]:
        B = features.shape[0]
        state = {"tokens": torch.zeros(B, 0, dtype=torch.long, device=features.device)}
        for i, (k, v) in enumerate(self._cross_kv(features)):
            state[f"cross_k.{i}"], state[f"cross_v.{i}"] = k, v
            # empty prefix caches (B, heads, 0, .): keys and values may differ in width (SoftAttention's do)
            state[f"self_k.{i}"], state[f"self_v.{i}"] = k[:, :, :0], v[:, :, :0]
        return state

    def step(self, tokens: Tensor, state: dict[str, Tensor], return_attention: bool = False):
        """(B,) previous words -> logits (B, V), new state [, last layer's cross-attention (B, T) for this word]."""
        t = state["tokens"].shape[1]
        if t >= self.max_len:
            raise ValueError(f"cannot decode past the decoder's max_len={self.max_len}")
        x = self.drop(self.tok_emb(tokens)[:, None] + self.pos_emb[t])
        new = {"tokens": torch.cat([state["tokens"], tokens[:, None]], dim=1)}
        att = None
        for i, block in enumerate(self.blocks):
            cross = state[f"cross_k.{i}"], state[f"cross_v.{i}"]
            past = state[f"self_k.{i}"], state[f"self_v.{i}"]
            want = return_attention and i == len(self.blocks) - 1
            x, (k, v), a = block(x, cross, past, need_weights=want)
            att = a if want else att
            new[f"cross_k.{i}"], new[f"cross_v.{i}"] = cross
            new[f"self_k.{i}"], new[f"self_v.{i}"] = k, v
        logits = self.head(self.ln_f(x[:, 0]))
        if return_attention:
            return logits, new, att[:, :, 0].mean(dim=1)  # (B, heads, 1, T) -> (B, T), rows sum to 1
        return logits, new
