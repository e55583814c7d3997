"""BLEU sufficient statistics: exact corpus BLEU of any resampled or weighted corpus without rescoring it.

Corpus BLEU is not a mean of per-image scores: it is a function of per-image counts SUMMED over the corpus. So a
resample of test images (bootstrap) only needs these counts once per image; each resample is then a weighted sum
(an image drawn twice counts twice) and one cheap formula, instead of a full pycocoevalcap run per resample.
The layout of one row, for BLEU up to order n (n=4 -> 10 columns):
  [correct_1..correct_n, guess_1..guess_n, hypothesis length, reference length]
"""

from __future__ import annotations

from typing import Sequence

from .ptb import evaluation_texts, tokenized_references


def cook_references(references: Sequence[Sequence[str]], n: int = 4, tokenizer: str | None = "auto") -> list:
    """Each image's references, tokenised and cooked by pycocoevalcap (n-gram max counts, lengths), for
    `bleu_stats(..., cooked=)` when many hypothesis sets are scored against the same references."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs

    gts = tokenized_references(references, tokenizer)
    return [cook_refs(gts[i], n=n) for i in gts]


def bleu_stats(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, cooked=None,
               tokenizer: str | None = "auto"):
    """Per-image BLEU sufficient statistics, shape (n_images, 2n+2) float64, computed exactly as pycocoevalcap's
    `Bleu(n).compute_score` does on the same (tokenised) text: clipped n-gram matches against the per-n-gram max
    count over all references, guess counts max(0, len-k+1), and the reference length closest to the hypothesis
    length (ties -> the shorter reference), as Bleu passes option='closest'. `cooked`: `cook_references` of
    `references`, computed once."""
    import numpy as np
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    if cooked is None:  # the references are tokenised with the hypotheses; pre-cooked ones only need the latter
        gts, res = evaluation_texts(hypotheses, references, tokenizer)
        cooked = [cook_refs(gts[i], n=n) for i in gts]
    else:
        _, res = evaluation_texts(hypotheses, [()] * len(hypotheses), tokenizer)
    out = np.zeros((len(res), 2 * n + 2), dtype=np.float64)
    for i in res:
        # pycocoevalcap's own cooking functions, so clipping and n-gram extraction cannot drift from its scorer
        comps = cook_test(res[i][0], cooked[i], n=n)
        testlen = comps["testlen"]
        reflen = min((abs(length - testlen), length) for length in comps["reflen"])[1]  # option='closest'
        out[i, :n] = comps["correct"]
        out[i, n:2 * n] = comps["guess"]
        out[i, 2 * n:] = testlen, reflen
    return out


def bleu_from_stats(totals):
    """Corpus BLEU-1..n from SUMMED sufficient statistics, vectorised: `totals` (..., 2n+2) -> (..., n).
    E.g. counts (B, n_images) @ bleu_stats(...) gives B resampled corpora; [..., 3] is their BLEU-4.
    Reproduces BleuScorer.compute_score: its `tiny`/`small` constants (an order with no guesses scores 0
    instead of dividing by zero) and the brevity penalty exp(1 - r/c) when the hypotheses are shorter."""
    import numpy as np

    small, tiny = 1e-9, 1e-15
    totals = np.asarray(totals, dtype=np.float64)
    n = (totals.shape[-1] - 2) // 2
    correct, guess = totals[..., :n], totals[..., n:2 * n]
    testlen, reflen = totals[..., 2 * n], totals[..., 2 * n + 1]
    # running product of the precisions, then the k-th root: the same operation order as pycocoevalcap
    precisions = np.cumprod((correct + tiny) / (guess + small), axis=-1)
    bleus = precisions ** (1.0 / np.arange(1, n + 1))
    ratio = (testlen + tiny) / (reflen + small)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return bleus * penalty[..., None]
