"""Trainable word decoders. Every decoder is an `nn.Module` built as `Decoder(vocab_size=..., feature_dim=..., ...)`
and implements one interface, which is all that training and `captioner.decoding` ever use:

  feature: str                        "pooled": features are (B, D); "spatial": (B, T, D) over a 2-D grid
  forward(features, captions)         teacher forcing: captions (B, L) = <sos> w1 .. <eos> <pad>.. ->
                                      logits (B, L-1, V), position t predicting captions[:, t+1]; a position
                                      never depends on later (padded) tokens
  init_state(features) -> state       dict of tensors, batch in dim 0 (beam search reorders it with
                                      `index_select(0, ...)` and expands it with `repeat_interleave(k, 0)`)
  step(tokens, state) -> (logits, state)
                                      previous words (B,) (<sos> first) -> next-word logits (B, V); step-wise
                                      decoding of the teacher tokens reproduces `forward`; an entry that
                                      never changes (per-image keys/values) may be handed back as the same
                                      object, and is then never reordered (it is never modified in place)
  per_image_state: tuple[str, ...]    optional: name prefixes of state entries that keep one row per image
                                      while the others hold G rows (beams) per image; `step` must accept that
"""

from __future__ import annotations

from torch import nn

from .recurrent import LSTMDecoder, LSTMInitDecoder, RNNDecoder
from .transformer import TransformerDecoder

DECODERS: dict[str, type[nn.Module]] = {
    "rnn": RNNDecoder,
    "lstm": LSTMDecoder,
    "lstm_init": LSTMInitDecoder,
    "transformer": TransformerDecoder,
}


def build_decoder(name: str, **kwargs) -> nn.Module:
    """`build_decoder("lstm", vocab_size=..., feature_dim=..., hidden_dim=...)`."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder '{name}' (config key decoder.name); known: {', '.join(DECODERS)}")
    return DECODERS[name](**kwargs)


__all__ = ["DECODERS", "build_decoder", "RNNDecoder", "LSTMDecoder", "LSTMInitDecoder", "TransformerDecoder"]
