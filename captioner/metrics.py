"""Captioning metrics, computed the conventional way.

- Corpus-level scores against ALL references of each image (never one row per reference).
- Test metrics use pycocoevalcap's own BLEU, ROUGE-L and CIDEr scorers (pure Python), and METEOR when Java is
  present (otherwise reported as None: skipped, never a crash). Input text is tokenised with the suite's one
  tokenizer (`normalize`), so hypotheses and references always match in form. Values are on pycocoevalcap's 0-1
  scale (CIDEr can exceed 1).
- Validation BLEU-1..4 use torchmetrics' `BLEUScore` (states sync under DDP); it splits on whitespace and is 0
  when any n-gram order has no match, hence also BLEU-1/2, which stay informative early in training.
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
