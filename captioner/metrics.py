"""Captioning metrics, computed as the official COCO caption evaluation (pycocoevalcap) computes them.

- Text is tokenised as pycocoevalcap's `PTBTokenizer` does (`captioner.ptb_tokenizer`): the Stanford PTB tokenizer
  itself when Java is present, else its pure-Python twin, which the tests hold token-for-token equal to it. Scores
  are then comparable with published ones; the suite's own training tokenizer (`vocabulary.tokenize`) never
  reaches a score. `tokenizer=` picks the backend (`auto` | `java` | `python`), or None for text that is
  already PTB-tokenised.
- Corpus-level scores against ALL references of each image (never one row per reference): pycocoevalcap's own
  BLEU, ROUGE-L and CIDEr-D scorers, and METEOR when Java is present (otherwise None: skipped, never a crash).
  Values are on pycocoevalcap's 0-1 scale (CIDEr can exceed 1); papers print them x100.
- Validation BLEU-1..4 (`val_bleu_scores`, checkpoint selection) are the same corpus BLEU on the same
  tokenisation, so the epoch is chosen on the metric that is reported. They are computed once per epoch from the
  outputs of the whole split (gathered from every rank and deduplicated under DDP, see
  `Captioner.gather_eval_outputs`), never from per-rank metric states: a DistributedSampler pads the last batch
  with repeated images, which synced states would count twice.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from typing import Sequence

from .ptb_tokenizer import ptb_tokenize

log = logging.getLogger(__name__)


def _tokenized(texts: Sequence[str], tokenizer: str | None) -> list[str]:
    return list(texts) if tokenizer is None else ptb_tokenize(texts, backend=tokenizer)


def _tokenized_references(references: Sequence[Sequence[str]], tokenizer: str | None) -> dict[int, list[str]]:
    rest = iter(_tokenized([r for refs in references for r in refs], tokenizer))
    return {i: [next(rest) for _ in refs] for i, refs in enumerate(references)}


def evaluation_texts(hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str | None = "auto"):
    """pycocoevalcap's inputs: ({i: [tokenised references]}, {i: [tokenised hypothesis]}). References and
    hypotheses are tokenised in two calls, in image order, as pycocoevalcap tokenises them: the PTB lexer reads a
    call's captions as one text, so a caption's last token can depend on the caption after it."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    gts = _tokenized_references(references, tokenizer)
    # pycocoevalcap's scorers choke on an empty hypothesis string; a lone space scores like an empty caption
    res = {i: [h or " "] for i, h in enumerate(_tokenized(hypotheses, tokenizer))}
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
                    per_image: bool = False, tokenizer: str | None = "auto") -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr (and METEOR) of a corpus; `per_image` adds per-image CIDEr/BLEU-4 lists
    (used by the bootstrap confidence intervals)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = evaluation_texts(hypotheses, references, tokenizer)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, cider_per = Cider().compute_score(gts, res)
    out = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
    out.update(rouge_l=float(rouge), cider=float(cider), meteor=meteor_score(gts, res) if meteor else None)
    if per_image:
        out["per_image"] = {"cider": [float(x) for x in cider_per], "bleu_4": [float(x) for x in bleu_per[3]]}
    return out


def val_bleu_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                    tokenizer: str | None = "auto") -> dict[str, float]:
    """Validation BLEU-1..4 of a whole split: `caption_metrics`' corpus BLEU on the same tokenisation, from
    sufficient statistics (no ROUGE/CIDEr/METEOR work each epoch)."""
    gts, res = evaluation_texts(hypotheses, references, tokenizer)
    bleu = bleu_from_stats(bleu_stats([res[i][0] for i in res], [gts[i] for i in gts], tokenizer=None).sum(0))
    return {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}


# -- BLEU sufficient statistics (exact corpus BLEU under bootstrap resampling) ---------------------------------------
# Corpus BLEU is not a mean of per-image scores: it is a function of per-image counts SUMMED over the corpus. So a
# resample of test images (bootstrap) only needs these counts once per image; each resample is then a weighted sum
# (an image drawn twice counts twice) and one cheap formula, instead of a full pycocoevalcap run per resample.
# The layout of one row, for BLEU up to order n (n=4 -> 10 columns):
#   [correct_1..correct_n, guess_1..guess_n, hypothesis length, reference length]

def cook_references(references: Sequence[Sequence[str]], n: int = 4, tokenizer: str | None = "auto") -> list:
    """Each image's references, tokenised and cooked by pycocoevalcap (n-gram max counts, lengths), for
    `bleu_stats(..., cooked=)` when many hypothesis sets are scored against the same references."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs

    gts = _tokenized_references(references, tokenizer)
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
