"""Recurrent word decoders over a pooled image vector: vanilla RNN, LSTM (Show and Tell), LSTM with image init.

All three share `_RecurrentDecoder`: word embedding, one `nn.RNN`/`nn.LSTM`, output head, and the plumbing of
the decoder interface (see `captioner.decoders`). They differ only in *where the image enters*:

  - `RNNDecoder`, `LSTMDecoder`  the projected image is the first input step, before `<sos>` (Show and Tell);
                                 the output at that step predicts no word;
  - `LSTMInitDecoder`            the projected image is the initial hidden and cell state; every input is a word.

Recurrent state lives in the step-state dict batch-first, (B, num_layers, H), so that generic decoding code can
reorder/expand beams with `index_select(0, ...)` / `repeat_interleave(k, 0)`; it is transposed to PyTorch's
(num_layers, B, H) only around the `nn.RNN`/`nn.LSTM` call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.vocabulary import Vocabulary
from .dropout import ByteDropout

# nn.RNN takes/returns a tensor h; nn.LSTM a tuple (h, c). Both (num_layers, B, H).
Hidden = Tensor | tuple[Tensor, Tensor]


class _RecurrentDecoder(nn.Module):
    """Embedding -> RNN/LSTM -> dropout -> Linear head. Subclasses set `cell` and implement `encode`."""

    feature = "pooled"  # features are (B, D)
    cell: type[nn.RNNBase]  # nn.RNN or nn.LSTM

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.vocab_size, self.feature_dim = vocab_size, feature_dim
        self.embed_dim, self.hidden_dim, self.num_layers = embed_dim, hidden_dim, num_layers
        # padding_idx: the <pad> embedding stays zero and gets no gradient (pad is only ever an input after <eos>).
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocabulary.pad_id)
        # PyTorch's inter-layer dropout is only defined for num_layers > 1 (it warns otherwise).
        self.rnn = self.cell(
            embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.drop = ByteDropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def encode(self, features: Tensor) -> tuple[Tensor | None, Hidden | None]:
        """Image (B, D) -> (input step (B, 1, E) fed before `<sos>`, or None; initial hidden, or None = zeros)."""
        raise NotImplementedError

    # -- the decoder interface ------------------------------------------------------------------------------

    def forward(self, features: Tensor, captions: Tensor, image_index: Tensor | None = None) -> Tensor:
        """Teacher forcing over the whole sequence in one cuDNN call: (B, D), (B, L) -> logits (B, L-1, V).

        Position t reads captions[:, :t+1] and predicts captions[:, t+1]; being recurrent (left to right), a
        position never sees later (padded) inputs. With `image_index` (B,), features hold U distinct images and
        caption b belongs to image image_index[b].
        """
        # Each distinct image is projected once, then copied to its captions: the projections are row-wise, so this
        # is the same as projecting every caption's copy, with 5x fewer rows (dino_lstm_init's two 1280 -> 512
        # projections and their gradients, on 2 CPU cores: 6 matmuls of 0.43 -> 0.28 ms; small matmuls there are
        # bound by reading the weights, not by the rows).
        image_step, hx = self.encode(features)
        if image_index is not None:
            image_step = None if image_step is None else image_step.index_select(0, image_index)
            hx = None if hx is None else self._select(hx, image_index)
        x = self.embed(captions[:, :-1])
        if image_step is not None:
            x = torch.cat([image_step, x], dim=1)
        out, _ = self._recur(x, hx, teacher_forcing=True)
        if image_step is not None:
            out = out[:, 1:]  # the image step's output predicts no word
        return self.head(self.drop(out))

    def init_state(self, features: Tensor) -> dict[str, Tensor]:
        image_step, hx = self.encode(features)
        if image_step is not None:
            _, hx = self._recur(image_step, hx)  # consume the image step, as `forward` does
        return self._to_state(hx)

    def step(self, tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(B,) previous words -> logits (B, V) for the next word, and the new state."""
        out, hx = self._recur(self.embed(tokens)[:, None], self._from_state(state))
        return self.head(self.drop(out[:, 0])), self._to_state(hx)

    def _recur(self, x: Tensor, hx: Hidden | None, teacher_forcing: bool = False) -> tuple[Tensor, Hidden]:
        """The RNN/LSTM call. Teacher forcing on CPU under bf16 autocast runs oneDNN's bf16 recurrent kernels
        (measured with AMX, a dino_lstm_init training step: 118 -> 37 ms; the sequence is at most 30 steps and
        the weights stay fp32 masters). Otherwise it runs in the parameters' dtype even under autocast: CUDA's
        fused LSTM cell has no bf16 kernel, and in step-wise decoding a bf16 state would lose precision step
        after step. The projections and the output head around it run under autocast either way."""
        if teacher_forcing and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return self.rnn(x, hx)
        dtype = self.rnn.weight_hh_l0.dtype
        if hx is not None:
            hx = tuple(h.to(dtype) for h in hx) if isinstance(hx, tuple) else hx.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return self.rnn(x.to(dtype), hx)

    # -- batch-first state <-> PyTorch's (num_layers, B, H) ---------------------------------------------------

    @staticmethod
    def _select(hx: Hidden, index: Tensor) -> Hidden:
        """The rows `index` of PyTorch-layout hidden state(s) (num_layers, B, H)."""
        if isinstance(hx, tuple):
            return tuple(h.index_select(1, index) for h in hx)
        return hx.index_select(1, index)

    @staticmethod
    def _to_state(hx: Hidden) -> dict[str, Tensor]:
        if isinstance(hx, tuple):
            return {"h": hx[0].transpose(0, 1), "c": hx[1].transpose(0, 1)}
        return {"h": hx.transpose(0, 1)}

    @staticmethod
    def _from_state(state: dict[str, Tensor]) -> Hidden:
        # The transposes are views, and cuDNN wants contiguous hidden states.
        h = state["h"].transpose(0, 1).contiguous()
        return (h, state["c"].transpose(0, 1).contiguous()) if "c" in state else h


class _ImageFirstStep(_RecurrentDecoder):
    """Show and Tell: LayerNorm -> Linear maps the image to a word-embedding-sized vector, fed as step 0."""

    def __init__(self, vocab_size: int, feature_dim: int, **kwargs) -> None:
        super().__init__(vocab_size, feature_dim, **kwargs)
        # LayerNorm first: cached features from different encoders differ wildly in scale (DINOv2 tokens vs
        # post-ReLU CNN pools), and the decoder should not have to learn that from the first updates.
        self.image_proj = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, self.embed_dim))

    def encode(self, features: Tensor) -> tuple[Tensor, None]:
        return self.image_proj(features)[:, None], None


class RNNDecoder(_ImageFirstStep):
    """Vanilla tanh RNN, image as the first input step."""

    cell = nn.RNN


class LSTMDecoder(_ImageFirstStep):
    """LSTM, image as the first input step (Show and Tell)."""

    cell = nn.LSTM


class LSTMInitDecoder(_RecurrentDecoder):
    """LSTM whose initial hidden and cell states are projections of the image; the inputs are words only."""

    cell = nn.LSTM

    def __init__(self, vocab_size: int, feature_dim: int, **kwargs) -> None:
        super().__init__(vocab_size, feature_dim, **kwargs)
        self.image_norm = nn.LayerNorm(feature_dim)
        # One Linear to num_layers*H is exactly one separate projection per layer, in a single matmul.
        self.init_h = nn.Linear(feature_dim, self.num_layers * self.hidden_dim)
        self.init_c = nn.Linear(feature_dim, self.num_layers * self.hidden_dim)

    def encode(self, features: Tensor) -> tuple[None, tuple[Tensor, Tensor]]:
        x = self.image_norm(features)
        shape = (features.shape[0], self.num_layers, self.hidden_dim)
        # tanh for h: it is an LSTM output, which lives in (-1, 1); c is unbounded.
        h = torch.tanh(self.init_h(x)).view(shape)
        c = self.init_c(x).view(shape)
        return None, self._from_state({"h": h, "c": c})
