"""Trainable word decoders. Every decoder is an `nn.Module` that Hydra builds from its YAML (conf/decoder/, a
`_partial_` node: `_target_` names the class) and the LightningModule completes with what only the data knows,
`decoder(vocab_size=..., feature_dim=...)` plus `grid=(rows, columns)` for a spatial one. A new decoder is a class
with this interface and one YAML; nothing here lists them. The interface is all that training and
`captioner.decoding` ever use:

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

from .attention import MultiHeadAttention, SoftAttention
from .recurrent import LSTMDecoder, LSTMInitDecoder, RNNDecoder
from .show_attend_tell import ShowAttendTellDecoder
from .transformer import TransformerDecoder

FEATURES = ("pooled", "spatial")


def interface_problem(cls) -> str | None:
    """Why `cls` is not a decoder class (None: it is one)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return "it is not an nn.Module class"
    if getattr(cls, "feature", None) not in FEATURES:
        return f"its class attribute `feature` is not one of {' | '.join(FEATURES)}"
    missing = [m for m in ("init_state", "step") if not callable(getattr(cls, m, None))]
    if missing:
        return f"it has no {' / '.join(missing)} method (the decoder interface of captioner.decoders)"
    return None


__all__ = ["FEATURES", "interface_problem", "MultiHeadAttention", "SoftAttention", "RNNDecoder", "LSTMDecoder",
           "LSTMInitDecoder", "TransformerDecoder", "ShowAttendTellDecoder"]
