"""Show, Attend and Tell (Xu et al. 2015): an LSTM that attends over the image's spatial tokens at every word, as
in the tutorial implementation many users know (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning); the spatial
family's recurrent decoder (`feature = "spatial"`).

  image tokens (B, T=h*w, D) -> LayerNorm -> Linear = annotation vectors a (B, T, d) = the memory
  h0 = tanh(Linear(mean_i a_i)), c0 = Linear(mean_i a_i)
  each word t:  context z = attention(query h_{t-1}, memory)              (soft attention: sum_i alpha_ti a_i)
                beta = sigmoid(f_beta(h_{t-1}))                            the gating scalar of the paper, per unit
                h_t, c_t = LSTMCell([embed(w_t); beta * z], (h_{t-1}, c_{t-1}))
                logits_t = Linear(dropout(h_t))

The LSTM cell is written out: its input-to-gates matrix is split into the word's share (`embed_gates`, applied to
every word of a caption in one matmul before the loop) and the context's (`context_gates`), and the
hidden-to-gates matrix shares one matmul with f_beta (`hidden_gates`), both being functions of h_{t-1}; this is
the same function as nn.LSTMCell on the concatenated input (gate order i, f, g, o). The memory's keys/values are
projected once per image; the output head runs once over all positions after the loop.

The attention mechanism is a component (conf/attention/, `attention=soft` as in the paper; `attention=mha` works
too), queried with h_{t-1} (through a Linear to the memory width when hidden_dim differs from it). Step state, all
batch-first so that generic beam search can reorder it:
  h, c                  (B, hidden_dim)   the LSTM state, in the parameters' dtype even under autocast
  memory_k / memory_v   the attention's keys/values of the memory (B, heads, T, .), projected once in
                        `init_state`; one row per image even when h/c hold G beams per image (`per_image_state`)
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ..data.vocabulary import Vocabulary
from .attention import SoftAttention
from .dropout import ByteDropout
from .transformer import AttentionFactory


class ShowAttendTellDecoder(nn.Module):
    feature = "spatial"  # features are (B, T, D), T = h*w tokens of a row-major grid
    # The memory's keys/values, shared by all beams of an image: beam search neither expands nor reorders them.
    per_image_state = ("memory_k", "memory_v")

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        grid: tuple[int, int] = (7, 7),
        attention: AttentionFactory | None = partial(SoftAttention, attention_dim=512),
        embed_dim: int = 256,
        hidden_dim: int = 512,
        memory_dim: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if attention is None:
            raise ValueError("ShowAttendTellDecoder needs an attention mechanism (attention=soft): attention is how "
                             "it sees the image")
        self.vocab_size, self.feature_dim = vocab_size, feature_dim
        self.embed_dim, self.hidden_dim, self.memory_dim = embed_dim, hidden_dim, memory_dim
        self.grid = (int(grid[0]), int(grid[1]))
        # LayerNorm first: cached features of different encoders differ wildly in scale (as in the other decoders).
        self.feat_proj = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, memory_dim))
        # No attention dropout: the tutorial has none, and dropping weights of a 49-token softmax at the decoder's
        # rate would blur what each word looks at; the decoder's dropout acts before the head.
        self.attention = attention(d_model=memory_dim, dropout=0.0)
        # Queries live in the memory's width (the attention's d_model); a Linear before the attention's own query
        # projection is still one linear map of h, so equal widths need none.
        self.query = nn.Identity() if hidden_dim == memory_dim else nn.Linear(hidden_dim, memory_dim, bias=False)
        self.init_h = nn.Linear(memory_dim, hidden_dim)
        self.init_c = nn.Linear(memory_dim, hidden_dim)
        # padding_idx: the <pad> embedding stays zero and gets no gradient (pad is only ever an input after <eos>).
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocabulary.pad_id)
        self.embed_gates = nn.Linear(embed_dim, 4 * hidden_dim, bias=False)  # the gates' bias is hidden_gates'
        self.context_gates = nn.Linear(memory_dim, 4 * hidden_dim, bias=False)
        self.hidden_gates = nn.Linear(hidden_dim, 4 * hidden_dim + memory_dim)  # [W_hh; f_beta]
        self.drop = ByteDropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    # -- image side ----------------------------------------------------------------------------------------

    def _encode(self, features: Tensor, image_index: Tensor | None = None):
        """Image tokens (U, T, D) -> the attention's keys/values of the memory and the initial (h, c), with
        `image_index` (B,) those of caption b's image image_index[b]; each image is projected once."""
        h, w = self.grid
        if features.dim() != 3 or features.shape[1] != h * w:
            raise ValueError(
                f"ShowAttendTellDecoder expects spatial features (B, {h * w}, D) for grid {self.grid}, got "
                f"{tuple(features.shape)}; the grid must match the encoder's feature map"
            )
        memory = self.feat_proj(features)
        k, v = self.attention.keys_values(memory, image_index)
        mean = memory.mean(dim=1)
        # tanh for h: it is an LSTM output, which lives in (-1, 1); c is unbounded (as LSTMInitDecoder).
        h0, c0 = torch.tanh(self.init_h(mean)), self.init_c(mean)
        if image_index is not None:
            h0, c0 = h0.index_select(0, image_index), c0.index_select(0, image_index)
        dtype = self.hidden_gates.weight.dtype
        return k, v, h0.to(dtype), c0.to(dtype)

    # -- one word -------------------------------------------------------------------------------------------

    def _word_gates(self, tokens: Tensor) -> Tensor:
        """Words (...,) -> their share of the LSTM gates (..., 4H), in the parameters' dtype."""
        return self.embed_gates(self.embed(tokens)).to(self.hidden_gates.weight.dtype)

    def _advance(self, word_gates: Tensor, h: Tensor, c: Tensor, k: Tensor, v: Tensor, need_weights: bool):
        """One LSTM step from (h, c) (N, H) reading the word's gates (N, 4H) and the attended memory -> h, c and
        the attention weights (N, heads, 1, T) when asked for.

        The matmuls run under autocast when it is on (bf16 on a CPU with bf16 hardware: they are most of a
        training step); the gates are summed and the state updated in the parameters' dtype, so that the state
        keeps its precision word after word in step-wise decoding, which runs this same step."""
        dtype, H = self.hidden_gates.weight.dtype, self.hidden_dim
        context, att = self.attention(self.query(h)[:, None], k, v, need_weights=need_weights)
        recurrent, beta = self.hidden_gates(h).to(dtype).split([4 * H, self.memory_dim], dim=-1)
        gated = torch.sigmoid(beta) * context[:, 0].to(dtype)
        i, f, g, o = (word_gates + recurrent + self.context_gates(gated).to(dtype)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c, att

    # -- the decoder interface ------------------------------------------------------------------------------

    def forward(self, features: Tensor, captions: Tensor, image_index: Tensor | None = None,
                return_attention: bool = False):
        """Teacher forcing, word by word: (B, T, D), (B, L) -> logits (B, L-1, V); being recurrent, a position
        never sees later (padded) inputs. With `image_index` (B,), features hold U distinct images and caption b
        belongs to image image_index[b]. With `return_attention`, also the attention behind each position
        (B, L-1, T), averaged over heads (what the attention regulariser reads)."""
        k, v, h, c = self._encode(features, image_index)
        word_gates = self._word_gates(captions[:, :-1])  # (B, L-1, 4H): every word's share in one matmul
        hs, atts = [], []
        # unbind, not word_gates[:, t]: the backward of one unbind is one stack, that of a slice per word a
        # zero-filled (B, L-1, 4H) gradient each
        for gates in word_gates.unbind(dim=1):
            h, c, att = self._advance(gates, h, c, k, v, return_attention)
            hs.append(h)
            if return_attention:
                atts.append(att[:, :, 0].mean(dim=1))
        logits = self.head(self.drop(torch.stack(hs, dim=1)))
        return (logits, torch.stack(atts, dim=1)) if return_attention else logits

    def init_state(self, features: Tensor) -> dict[str, Tensor]:
        k, v, h, c = self._encode(features)
        return {"h": h, "c": c, "memory_k": k, "memory_v": v}

    def step(self, tokens: Tensor, state: dict[str, Tensor], return_attention: bool = False):
        """(N,) previous words -> logits (N, V), new state [, attention (N, T) for this word]. N may be G times the
        rows of memory_k/memory_v (G beams of each image, see `per_image_state`)."""
        k, v = state["memory_k"], state["memory_v"]
        h, c, att = self._advance(self._word_gates(tokens), state["h"], state["c"], k, v, return_attention)
        logits = self.head(self.drop(h))
        new = {"h": h, "c": c, "memory_k": k, "memory_v": v}
        if return_attention:
            return logits, new, att[:, :, 0].mean(dim=1)  # (N, heads, 1, T) -> (N, T), rows sum to 1
        return logits, new
