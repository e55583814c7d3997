"""Caption generation for any decoder implementing the interface of `captioner.decoders`
(`init_state(features) -> state`, `step(tokens, state) -> (logits, state)`), batched over images.

  greedy_decode(decoder, features, max_len=30)             argmax word by word, all images together
  beam_search(decoder, features, beam_size=3, max_len=30)  B images x K beams as B*K rows of one step call;
                                                           each step: expand, select the top K, retire the
                                                           finished, drop the done images, follow the beams
  sample_captions(decoder, features, n_samples=5)          B images x n samples drawn word by word (with
                                                           temperature and top-k): diverse captions, and what
                                                           self-critical training rewards

The first two return one list of word ids per image, without `<sos>`/`<eos>`/`<pad>`, at most `max_len` words,
and with `return_scores=True` also each caption's score (sum of log-probabilities; for beam search divided by the
length penalty when one is set); sampling returns the id tensor (`to_word_lists` makes lists of it). All run under `torch.no_grad()`, on the features' device, and under
`torch.autocast` (log-softmax and scores are float32). Not `torch.inference_mode()`: it turns off autocast's
cache of low-precision weight copies, and each step would then re-cast every weight. They do not change the
decoder's train/eval mode: call `decoder.eval()` first, or dropout will sample.

`<sos>` and `<pad>` are never generated (they are never training targets, so any probability the model gives
them is noise), `<eos>` is not allowed before `min_len` words, and the ids in `suppress` are never generated
(`Captioner.generate` passes `<unk>` there under `decode.suppress_unk`, as the research codebases do: an unknown
word is never a useful caption word, and it would be scored as a word no reference has). With `block_trigrams`
no caption repeats a trigram ("a red circle and a red circle"): the word that would is banned at that step.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .data.vocabulary import Vocabulary

SOS, EOS, PAD = Vocabulary.sos_id, Vocabulary.eos_id, Vocabulary.pad_id


def _next_log_probs(
    decoder: nn.Module, tokens: Tensor, state: dict, n_words: int, min_len: int, sos_id: int, eos_id: int, pad_id: int,
    suppress: Sequence[int] = (), history: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """One decoder step -> float32 log-probabilities (N, V) of the next word with the banned words at -inf.
    `history` (N, n_words): the words so far, given when repeated trigrams are banned (`block_trigrams`).

    Banned words are masked after the log-softmax, not before, so that scores stay the model's own
    log-probabilities of the sequence (masking first would renormalise over the allowed words).
    """
    logits, state = decoder.step(tokens, state)
    logp = logits.float().log_softmax(dim=-1)
    banned = [sos_id, pad_id, *suppress] + ([eos_id] if n_words < min_len else [])
    logp[:, banned] = float("-inf")
    if history is not None:
        ban_repeated_trigrams(logp, history)
    return logp, state


def ban_repeated_trigrams(logp: Tensor, history: Tensor) -> None:
    """In place: for each row, -inf for every word that would repeat a trigram of `history` (N, t), i.e. the
    words that followed the row's last two words before (the research codebases' `block_trigrams`)."""
    if history.shape[1] < 3:
        return
    a, b = history[:, -2:-1], history[:, -1:]
    seen = (history[:, :-2] == a) & (history[:, 1:-1] == b)  # (N, t-2): earlier places of the last bigram
    rows, at = seen.nonzero(as_tuple=True)
    logp[rows, history[rows, at + 2]] = float("-inf")


def _reorder(x: Tensor, rows: Tensor) -> Tensor:
    """x.index_select(0, rows), through a 2-D (N, -1) view: on CPU that is a plain row copy, much faster than
    index_select on the N-D tensor (the transformer's caches are reordered every step)."""
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
    block_trigrams: bool = False,
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
        logp, state = _next_log_probs(decoder, tokens, state, t, min_len, sos_id, eos_id, pad_id, suppress,
                                      seqs[:, :t] if block_trigrams else None)
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
def sample_captions(
    decoder: nn.Module,
    features: Tensor,
    n_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    max_len: int = 30,
    sos_id: int = SOS,
    eos_id: int = EOS,
    *,
    min_len: int = 0,
    pad_id: int = PAD,
    suppress: Sequence[int] = (),
    block_trigrams: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`n_samples` captions per image, each word drawn from softmax(logits / temperature) over the allowed words
    (only the `top_k` most probable ones when top_k > 0), every image and sample in one batch: rows
    b*n .. b*n+n-1 are image b's. Returns their ids (B*n, max_len): the words, `<eos>` (unless max_len came
    first), then `<pad>`; `to_word_lists` makes lists of them. Self-critical training samples with this."""
    if n_samples < 1 or temperature <= 0 or top_k < 0:
        raise ValueError(f"sampling needs n_samples >= 1, temperature > 0 and top_k >= 0, got {n_samples}, "
                         f"{temperature}, {top_k}")
    B, device = features.shape[0], features.device
    shared = tuple(getattr(decoder, "per_image_state", ()))  # kept at one row per image, as in beam search
    state = {name: x if shared and name.startswith(shared) else x.repeat_interleave(n_samples, dim=0)
             for name, x in decoder.init_state(features).items()}
    N = B * n_samples
    tokens = torch.full((N,), sos_id, dtype=torch.long, device=device)
    seqs = torch.full((N, max_len), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    for t in range(max_len):
        logp, state = _next_log_probs(decoder, tokens, state, t, min_len, sos_id, eos_id, pad_id, suppress,
                                      seqs[:, :t] if block_trigrams else None)
        if top_k:
            kth = logp.topk(min(top_k, logp.shape[-1]), dim=-1).values[:, -1:]
            logp = logp.masked_fill(logp < kth, float("-inf"))
        tokens = torch.multinomial((logp / temperature).softmax(dim=-1), 1, generator=generator).squeeze(1)
        tokens = tokens.masked_fill(finished, pad_id)
        seqs[:, t] = tokens
        finished |= tokens == eos_id
        if finished.all():
            break
    return seqs


def to_word_lists(seqs: Tensor, sos_id: int = SOS, eos_id: int = EOS, pad_id: int = PAD) -> list[list[int]]:
    """(N, T) generated ids -> one list of word ids per row, cut at the first `<eos>`, special ids left out."""
    return _to_lists(seqs, sos_id, eos_id, pad_id)


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
    block_trigrams: bool = False,
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

    def penalty(n_words: int) -> float:
        return ((5.0 + n_words) / 6.0) ** length_penalty

    search = _Beams(decoder, features, beam_size, max_len, sos_id, pad_id)
    answers = _Answers(features.shape[0], max_len, pad_id, features.device)
    for t in range(max_len):  # t = words in each live beam before this step
        logp = search.expand(decoder, t, min_len, sos_id, eos_id, pad_id, suppress, block_trigrams)
        word, src = search.select_top_k(logp, t)
        search.retire_finished(word, eos_id, penalty(t))
        done = search.done(max(penalty(t + 1), penalty(max_len)))
        if bool(done.any()):
            answers.take(search.alive[done], search.best[done], search.best_seq[done])
            keep = (~done).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            word, src = search.drop_done(keep, word, src)
        search.follow(word, src)
    else:
        answers.take(search.alive, *search.answers_at_max_len(penalty(max_len)))
    ids = _to_lists(answers.seq, sos_id, eos_id, pad_id)
    return (ids, answers.score.tolist()) if return_scores else ids


class _Answers:
    """Each image's answer (caption and penalised score), filled in as its search ends."""

    def __init__(self, batch: int, max_len: int, pad_id: int, device) -> None:
        self.score = torch.full((batch,), float("-inf"), device=device)
        self.seq = torch.full((batch, max_len), pad_id, dtype=torch.long, device=device)

    def take(self, images: Tensor, score: Tensor, seq: Tensor) -> None:
        self.score[images], self.seq[images] = score, seq


class _Beams:
    """The K beams of every image still being searched, and each one's best finished caption.

    Row b*K + k is beam k of live image b, everywhere: state, tokens, seqs. `alive` maps the live images to the
    batch. A done image's rows leave every tensor, so later steps compute only the images still searching instead
    of the whole batch until its longest caption ends (the gain grows with the spread of caption lengths).
    """

    def __init__(self, decoder: nn.Module, features: Tensor, K: int, max_len: int, sos_id: int, pad_id: int) -> None:
        B, device = features.shape[0], features.device
        self.K, self.max_len = K, max_len
        self.shared = tuple(getattr(decoder, "per_image_state", ()))  # entries kept at one row per image
        self.state = {name: x if self._per_image(name) else x.repeat_interleave(K, dim=0)
                      for name, x in decoder.init_state(features).items()}
        self.constant = dict(self.state)  # entries still identical to these objects were never changed by a step
        self.tokens = torch.full((B * K,), sos_id, dtype=torch.long, device=device)
        self.seqs = torch.full((B * K, max_len), pad_id, dtype=torch.long, device=device)
        # At the start the K beams of an image are the same <sos>: only one is live, or the top-K of the first step
        # would be K copies of the same word.
        self.scores = torch.full((B, K), float("-inf"), device=device)
        self.scores[:, 0] = 0.0
        self.best = torch.full((B,), float("-inf"), device=device)  # best finished caption, length-penalised
        self.best_seq = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)
        self.alive = torch.arange(B, device=device)
        self.beams = torch.arange(K, device=device)

    def _per_image(self, name: str) -> bool:
        return bool(self.shared) and name.startswith(self.shared)

    def _rows(self) -> Tensor:
        return torch.arange(len(self.alive), device=self.alive.device)

    def expand(self, decoder: nn.Module, t: int, min_len: int, sos_id: int, eos_id: int, pad_id: int,
               suppress: Sequence[int], block_trigrams: bool = False) -> Tensor:
        """One decoder step of every live beam: the log-probabilities (n*K, V) of each next word."""
        logp, self.state = _next_log_probs(decoder, self.tokens, self.state, t, min_len, sos_id, eos_id, pad_id,
                                           suppress, self.seqs[:, :t] if block_trigrams else None)
        self.constant = {name: x for name, x in self.state.items() if x is self.constant.get(name)}
        return logp

    def select_top_k(self, logp: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Keep each image's K best continuations: their words (n, K) and the rows they continue (n, K).
        `scores` becomes theirs, `seqs` their words so far."""
        n, K, V = len(self.alive), self.K, logp.shape[-1]
        # All K*V continuations of an image side by side; flat index i = beam * V + word.
        self.scores, idx = (self.scores.view(n * K, 1) + logp).view(n, K * V).topk(K, dim=1)
        word = idx % V
        src = self._rows()[:, None] * K + idx // V
        self.seqs = self.seqs.index_select(0, src.view(-1))
        self.seqs[:, t] = word.view(-1)
        return word, src

    def retire_finished(self, word: Tensor, eos_id: int, divisor: float) -> None:
        """Candidates ending in <eos> leave the beam; each image keeps its best by the penalised score."""
        # isfinite: a dead beam (score -inf) can be picked when fewer than K candidates are live.
        ended = (word == eos_id) & torch.isfinite(self.scores)
        ranked = torch.where(ended, self.scores / divisor, float("-inf"))
        r_best, r_arg = ranked.max(dim=1)
        better = r_best > self.best  # strict: among equals the earliest (shortest) hypothesis stays
        self.best = torch.where(better, r_best, self.best)
        candidates = self.seqs.view(len(self.alive), self.K, self.max_len)[self._rows(), r_arg]
        self.best_seq = torch.where(better[:, None], candidates, self.best_seq)
        self.scores = self.scores.masked_fill(ended, float("-inf"))  # finished beams are no longer extended

    def done(self, largest_divisor: float) -> Tensor:
        """(n,) which images no live beam can still beat: log-probabilities are <= 0, so a live beam's score only
        falls, and its penalty divisor grows (alpha > 0) at most to `largest_divisor`."""
        return self.best >= self.scores.max(dim=1).values / largest_divisor

    def drop_done(self, keep: Tensor, word: Tensor, src: Tensor) -> tuple[Tensor, Tensor]:
        """Only the images `keep` (indices among the live ones) go on; returns their words and source rows."""
        n, K = len(self.alive), self.K
        self.alive, self.best, self.best_seq, self.scores = (
            x[keep] for x in (self.alive, self.best, self.best_seq, self.scores))
        self.seqs = self.seqs.view(n, K, self.max_len)[keep].view(-1, self.max_len)
        rows = (keep[:, None] * K + self.beams).view(-1)  # the kept images' rows before this step
        self.constant = {name: _reorder(x, keep if self._per_image(name) else rows)
                         for name, x in self.constant.items()}
        return word[keep], src[keep]

    def follow(self, word: Tensor, src: Tensor) -> None:
        """Each new beam takes the decoder state of the row it continues, and its word is the next input."""
        # A state tensor the step handed back unchanged holds the same values for every beam of an image (the
        # transformer's per-image cross-attention keys/values; K identical copies for a decoder without
        # `per_image_state`), and beams only move within their image: reordering it would copy it for nothing.
        self.state = {name: self.constant[name] if name in self.constant else _reorder(x, src.view(-1))
                      for name, x in self.state.items()}
        self.tokens = word.view(-1)

    def answers_at_max_len(self, divisor: float) -> tuple[Tensor, Tensor]:
        """(score, caption) of each image still searching at max_len: its best finished caption, or where no beam
        ever emitted <eos> (e.g. an untrained model), its best live beam."""
        live_score, live_arg = self.scores.max(dim=1)
        none_finished = self.best == float("-inf")
        live_seq = self.seqs.view(len(self.alive), self.K, self.max_len)[self._rows(), live_arg]
        return (torch.where(none_finished, live_score / divisor, self.best),
                torch.where(none_finished[:, None], live_seq, self.best_seq))
