"""Captioning metrics, computed the conventional way.

- Corpus-level scores against ALL references of each image (never one row per reference).
- Test metrics use pycocoevalcap's own BLEU, ROUGE-L and CIDEr scorers (pure Python), and METEOR when Java is
  present (otherwise reported as None: skipped, never a crash). Input text is tokenised with the suite's one
  tokenizer (`normalize`), so hypotheses and references always match in form. Values are on pycocoevalcap's 0-1
  scale (CIDEr can exceed 1).
- Validation BLEU-1..4 use torchmetrics' BLEU (`val_bleu_scores`); it splits on whitespace and is 0 when any
  n-gram order has no match, hence also BLEU-1/2, which stay informative early in training. It is computed once
  per epoch from the outputs of the whole split (gathered from every rank and deduplicated under DDP, see
  `Captioner.gather_eval_outputs`), never from per-rank metric states: a DistributedSampler pads the last batch
  with repeated images, which synced states would count twice.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from typing import Sequence

from .data.vocabulary import normalize

log = logging.getLogger(__name__)


def _gts_res(hypotheses: Sequence[str], references: Sequence[Sequence[str]]):
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    gts = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
    # pycocoevalcap's scorers choke on an empty hypothesis string; a lone space scores like an empty caption
    res = {i: [normalize(h) or " "] for i, h in enumerate(hypotheses)}
    return gts, res


def java_available() -> bool:
    return shutil.which("java") is not None


def meteor_score(gts: dict, res: dict) -> float | None:
    """METEOR 1.5 through pycocoevalcap's Java wrapper; None when Java is missing or METEOR fails."""
    if not java_available():
        log.info("METEOR skipped: no `java` on PATH (install a JRE to compute it)")
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = None
    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except Exception as e:  # a broken Java install must not cost the user the other metrics
        log.warning("METEOR skipped: %s: %s", type(e).__name__, e)
        return None
    finally:
        if scorer is not None:
            with contextlib.suppress(Exception):
                scorer.meteor_p.kill()
                scorer.meteor_p.wait(timeout=5)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = True,
                    per_image: bool = False) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr (and METEOR) of a corpus; `per_image` adds per-image CIDEr/BLEU-4 lists
    (used by the bootstrap confidence intervals)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _gts_res(hypotheses, references)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, cider_per = Cider().compute_score(gts, res)
    out = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
    out.update(rouge_l=float(rouge), cider=float(cider), meteor=meteor_score(gts, res) if meteor else None)
    if per_image:
        out["per_image"] = {"cider": [float(x) for x in cider_per], "bleu_4": [float(x) for x in bleu_per[3]]}
    return out


def bleu_metrics():
    """torchmetrics BLEU-1..4 modules for validation (strings are normalised by the caller)."""
    from torchmetrics.text import BLEUScore

    return {f"bleu_{n}": BLEUScore(n_gram=n) for n in range(1, 5)}


def val_bleu_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Validation BLEU-1..4 of a whole split at once: torchmetrics' BLEU, the same numbers as the `bleu_metrics`
    modules updated batch by batch (their states are summed n-gram counts), but local to this process."""
    from torchmetrics.functional.text import bleu_score

    hyps, refs = list(hypotheses), [list(r) for r in references]
    return {f"bleu_{n}": float(bleu_score(hyps, refs, n_gram=n)) for n in range(1, 5)}


# -- BLEU sufficient statistics (exact corpus BLEU under bootstrap resampling) ---------------------------------------
# Corpus BLEU is not a mean of per-image scores: it is a function of per-image counts SUMMED over the corpus. So a
# resample of test images (bootstrap) only needs these counts once per image; each resample is then a weighted sum
# (an image drawn twice counts twice) and one cheap formula, instead of a full pycocoevalcap run per resample.
# The layout of one row, for BLEU up to order n (n=4 -> 10 columns):
#   [correct_1..correct_n, guess_1..guess_n, hypothesis length, reference length]

def cook_references(references: Sequence[Sequence[str]], n: int = 4) -> list:
    """Each image's references, normalised and cooked by pycocoevalcap (n-gram max counts, lengths), for
    `bleu_stats(..., cooked=)` when many hypothesis sets are scored against the same references."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs

    gts, _ = _gts_res([""] * len(references), references)
    return [cook_refs(gts[i], n=n) for i in gts]


def bleu_stats(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, cooked=None):
    """Per-image BLEU sufficient statistics, shape (n_images, 2n+2) float64, computed exactly as pycocoevalcap's
    `Bleu(n).compute_score` does on the same (normalised) text: clipped n-gram matches against the per-n-gram max
    count over all references, guess counts max(0, len-k+1), and the reference length closest to the hypothesis
    length (ties -> the shorter reference), as Bleu passes option='closest'. `cooked`: `cook_references` of
    `references`, computed once."""
    import numpy as np
    from pycocoevalcap.bleu.bleu_scorer import cook_test

    gts, res = _gts_res(hypotheses, references)  # same tokenisation (and empty-hypothesis guard) as caption_metrics
    cooked = cook_references(references, n) if cooked is None else cooked
    out = np.zeros((len(gts), 2 * n + 2), dtype=np.float64)
    for i in gts:
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
