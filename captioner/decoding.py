"""Caption generation for any decoder implementing the interface of `captioner.decoders`
(`init_state(features) -> state`, `step(tokens, state) -> (logits, state)`), batched over images.

  greedy_decode(decoder, features, max_len=30)             argmax word by word, all images together
  beam_search(decoder, features, beam_size=3, max_len=30)  B images x K beams as B*K rows of one step call

Both return one list of word ids per image, without `<sos>`/`<eos>`/`<pad>`, at most `max_len` words, and with
`return_scores=True` also each caption's score (sum of log-probabilities; for beam search divided by the length
penalty when one is set). They run under `torch.no_grad()`, on the features' device, and under
`torch.autocast` (log-softmax and scores are float32). Not `torch.inference_mode()`: it turns off autocast's
cache of low-precision weight copies, and each step then re-casts every weight (3 casts per Linear call instead
of 1; batched beam-3 under bf16 on 2 CPU cores 3.75 vs 3.15 ms/image, the same captions). They do not change
the decoder's train/eval mode: call `decoder.eval()` first, or dropout will sample.

`<sos>` and `<pad>` are never generated (they are never training targets, so any probability the model gives
them is noise), `<eos>` is not allowed before `min_len` words, and the ids in `suppress` are never generated
(`Captioner.generate` passes `<unk>` there under `decode.suppress_unk`, as the research codebases do: an unknown
word is never a useful caption word, and it would be scored as a word no reference has).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .data.vocabulary import Vocabulary

SOS, EOS, PAD = Vocabulary.sos_id, Vocabulary.eos_id, Vocabulary.pad_id


def _next_log_probs(
    decoder: nn.Module, tokens: Tensor, state: dict, n_words: int, min_len: int, sos_id: int, eos_id: int, pad_id: int,
    suppress: Sequence[int] = (),
) -> tuple[Tensor, dict]:
    """One decoder step -> float32 log-probabilities (N, V) of the next word with the banned words at -inf.

    Banned words are masked after the log-softmax, not before, so that scores stay the model's own
    log-probabilities of the sequence (masking first would renormalise over the allowed words).
    """
    logits, state = decoder.step(tokens, state)
    logp = logits.float().log_softmax(dim=-1)
    banned = [sos_id, pad_id, *suppress] + ([eos_id] if n_words < min_len else [])
    logp[:, banned] = float("-inf")
    return logp, state


def _reorder(x: Tensor, rows: Tensor) -> Tensor:
    """x.index_select(0, rows), through a 2-D (N, -1) view: on CPU that is a plain row copy, several times faster
    than index_select on the N-D tensor (which dominated batched beam search with the transformer's caches)."""
    if x.dim() <= 2:
        return x.index_select(0, rows)
    return x.flatten(1).index_select(0, rows).view(len(rows), *x.shape[1:])


def _to_lists(seqs: Tensor, sos_id: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """(N, max_len) ids -> lists cut at the first <eos>, with no special ids left."""
    out = []
    for row in seqs.tolist():
        words = []
        for i in row:
            if i == eos_id:
                break
            if i not in (sos_id, pad_id):
                words.append(i)
        out.append(words)
    return out


@torch.no_grad()  # not inference_mode: see the module docstring
def greedy_decode(
    decoder: nn.Module,
    features: Tensor,
    max_len: int = 30,
    sos_id: int = SOS,
    eos_id: int = EOS,
    *,
    min_len: int = 0,
    pad_id: int = PAD,
    suppress: Sequence[int] = (),
    return_scores: bool = False,
):
    """Most probable next word at every step, for the whole batch at once; stops when every caption has ended."""
    B, device = features.shape[0], features.device
    state = decoder.init_state(features)
    tokens = torch.full((B,), sos_id, dtype=torch.long, device=device)
    seqs = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)
    scores = torch.zeros(B, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_len):
        logp, state = _next_log_probs(decoder, tokens, state, t, min_len, sos_id, eos_id, pad_id, suppress)
        best, tokens = logp.max(dim=-1)
        scores += best.masked_fill(finished, 0.0)
        tokens = tokens.masked_fill(finished, pad_id)  # ended captions only get padding (never read back)
        seqs[:, t] = tokens
        finished |= tokens == eos_id
        if finished.all():
            break
    ids = _to_lists(seqs, sos_id, eos_id, pad_id)
    return (ids, scores.tolist()) if return_scores else ids


@torch.no_grad()  # not inference_mode: see the module docstring
def beam_search(
    decoder: nn.Module,
    features: Tensor,
    beam_size: int = 3,
    max_len: int = 30,
    min_len: int = 1,
    length_penalty: float = 0.0,
    sos_id: int = SOS,
    eos_id: int = EOS,
    pad_id: int = PAD,
    suppress: Sequence[int] = (),
    return_scores: bool = False,
):
    """Batched beam search: the most probable caption of each image found by keeping `beam_size` prefixes.

    Each step expands every live beam by every word and keeps the K best candidates of each image. A
    candidate ending in `<eos>` is finished: it leaves the beam (its slot is refilled at the next step) and
    competes for the image's answer with score / ((5 + n_words) / 6) ** length_penalty (GNMT; 0 = plain sum
    of log-probabilities, which favours short captions). An image is done when none of its live beams can still
    beat its best finished caption; if nothing ever finished by `max_len`, the best live beam is the answer.
    With beam_size=1 this is exactly `greedy_decode` (same min_len).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    B, K, device = features.shape[0], beam_size, features.device
    NEG = float("-inf")

    def penalty(n_words: int) -> float:
        return ((5.0 + n_words) / 6.0) ** length_penalty

    # Row b*K + k is beam k of live image b, everywhere: state, tokens, seqs. Live images are the ones still being
    # searched: `alive` maps them to the batch. A finished image's answer goes to `out_*` and its rows leave every
    # tensor, so later steps compute only the images still searching instead of the whole batch until its longest
    # caption ends (the gain grows with the spread of caption lengths in the batch).
    shared = tuple(getattr(decoder, "per_image_state", ()))  # entries kept at one row per image (not per beam)
    state = {name: x if name.startswith(shared) and shared else x.repeat_interleave(K, dim=0)
             for name, x in decoder.init_state(features).items()}
    constant = dict(state)  # entries still identical to these objects were never changed by a step (see below)
    tokens = torch.full((B * K,), sos_id, dtype=torch.long, device=device)
    seqs = torch.full((B * K, max_len), pad_id, dtype=torch.long, device=device)
    # At the start the K beams of an image are the same <sos>: only one is live, or the top-K of the first step
    # would be K copies of the same word.
    scores = torch.full((B, K), NEG, device=device)
    scores[:, 0] = 0.0
    best = torch.full((B,), NEG, device=device)  # best finished hypothesis per image, length-penalised
    best_seq = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)
    alive = torch.arange(B, device=device)
    out_best = torch.full((B,), NEG, device=device)
    out_seq = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)
    beams = torch.arange(K, device=device)

    steps = 0
    for t in range(max_len):  # t = words in each live beam before this step
        n = len(alive)
        logp, state = _next_log_probs(decoder, tokens, state, t, min_len, sos_id, eos_id, pad_id, suppress)
        constant = {name: x for name, x in state.items() if x is constant.get(name)}
        V = logp.shape[-1]
        # All K*V continuations of an image side by side; flat index i = beam * V + word.
        top, idx = (scores.view(n * K, 1) + logp).view(n, K * V).topk(K, dim=1)
        word = idx % V
        src = torch.arange(n, device=device)[:, None] * K + idx // V  # the row each new beam continues (n, K)
        seqs = seqs.index_select(0, src.view(-1))
        seqs[:, t] = word.view(-1)
        steps = t + 1

        # Candidates ending in <eos> are finished (t words); keep each image's best by the penalised score.
        # isfinite: a dead beam (score -inf) can be picked when fewer than K candidates are live.
        ended = (word == eos_id) & torch.isfinite(top)
        ranked = torch.where(ended, top / penalty(t), NEG)
        r_best, r_arg = ranked.max(dim=1)
        better = r_best > best  # strict: among equals the earliest (shortest) hypothesis stays
        best = torch.where(better, r_best, best)
        best_seq = torch.where(better[:, None], seqs.view(n, K, max_len)[torch.arange(n, device=device), r_arg],
                               best_seq)
        scores = top.masked_fill(ended, NEG)  # finished beams are no longer extended

        # Log-probabilities are <= 0, so a live beam's score only falls; the penalty divisor grows (alpha > 0)
        # at most to penalty(max_len). An image whose best finished caption beats that bound is done.
        bound = scores.max(dim=1).values / max(penalty(t + 1), penalty(max_len))
        done = best >= bound
        if bool(done.any()):
            out_best[alive[done]], out_seq[alive[done]] = best[done], best_seq[done]
            keep = (~done).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            alive, best, best_seq, scores, word, src = (x[keep] for x in (alive, best, best_seq, scores, word, src))
            seqs = seqs.view(n, K, max_len)[keep].view(-1, max_len)
            rows = (keep[:, None] * K + beams).view(-1)  # the kept images' rows before this step
            constant = {name: _reorder(x, keep if shared and name.startswith(shared) else rows)
                        for name, x in constant.items()}
        # A state tensor the step handed back unchanged holds the same values for every beam of an image (the
        # transformer's per-image cross-attention keys/values; K identical copies for a decoder without
        # `per_image_state`), and beams only move within their image: reordering it would copy megabytes per step
        # for nothing (it was most of batched beam search's time).
        state = {name: constant[name] if name in constant else _reorder(x, src.view(-1)) for name, x in state.items()}
        tokens = word.view(-1)
    else:
        # max_len reached with images still searching: their best finished caption, or where no beam ever emitted
        # <eos> (e.g. an untrained model), the best live beam at max length.
        live_score, live_arg = scores.max(dim=1)
        none_finished = best == NEG
        n = len(alive)
        live_seq = seqs.view(n, K, max_len)[torch.arange(n, device=device), live_arg]
        best_seq = torch.where(none_finished[:, None], live_seq, best_seq)
        best = torch.where(none_finished, live_score / penalty(steps), best)
        out_best[alive], out_seq[alive] = best, best_seq

    ids = _to_lists(out_seq, sos_id, eos_id, pad_id)
    return (ids, out_best.tolist()) if return_scores else ids
