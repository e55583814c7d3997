"""Captioning metrics, computed as the official COCO caption evaluation (pycocoevalcap) computes them.

- Text is tokenised as pycocoevalcap's `PTBTokenizer` does (`captioner.scoring.ptb`): the Stanford PTB tokenizer
  itself when Java is present, else its pure-Python twin, which the tests hold token-for-token equal to it. Scores
  are then comparable with published ones; the suite's own training tokenizer (`vocabulary.tokenize`) never
  reaches a score. `tokenizer=` picks the backend (`auto` | `java` | `python`), or None for text that is
  already PTB-tokenised.
- Corpus-level scores against ALL references of each image (never one row per reference): pycocoevalcap's own
  BLEU and ROUGE-L scorers, CIDEr-D from `captioner.scoring.cider` (held equal to pycocoevalcap's by the tests; the
  self-critical reward is the same code), and METEOR when Java is present (otherwise None: skipped, never a crash).
  Values are on pycocoevalcap's 0-1 scale (CIDEr can exceed 1); papers print them x100.
- Validation BLEU-1..4 and CIDEr-D (`validation_scores`, checkpoint selection: BLEU-4 after cross-entropy training,
  CIDEr-D after self-critical training) are the same corpus scores on the same tokenisation, so the epoch is chosen
  on the metric that is reported. They are computed once per epoch from the
  outputs of the whole split (gathered from every rank and deduplicated under DDP, see
  `Captioner.gather_eval_outputs`), never from per-rank metric states: a DistributedSampler pads the last batch
  with repeated images, which synced states would count twice.
- Two reference points next to a model's scores: `caption_prior_baseline` (the best constant training caption,
  a model that ignores the image) and `reference_agreement` (the references scored against each other).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections import Counter
from typing import TYPE_CHECKING, Iterable, Sequence

from ..data.records import CaptionDataset, CaptionRecord
from .bootstrap import bleu_from_stats, bleu_stats, cook_references
from .cider import cider_d
from .ptb import evaluation_texts, tokenized_references

if TYPE_CHECKING:
    from ..data.datamodule import CaptionDataModule

log = logging.getLogger(__name__)


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
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = evaluation_texts(hypotheses, references, tokenizer)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_per = cider_d([res[i][0] for i in res], [gts[i] for i in gts])
    out = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
    out.update(rouge_l=float(rouge), cider=float(cider), meteor=meteor_score(gts, res) if meteor else None)
    if per_image:
        out["per_image"] = {"cider": [float(x) for x in cider_per], "bleu_4": [float(x) for x in bleu_per[3]]}
    return out


def validation_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                      tokenizer: str | None = "auto") -> dict[str, float]:
    """Validation BLEU-1..4 and CIDEr-D of a whole split: `caption_metrics`' corpus scores on the same
    tokenisation, BLEU from sufficient statistics (no ROUGE/METEOR work each epoch)."""
    gts, res = evaluation_texts(hypotheses, references, tokenizer)
    hyps, refs = [res[i][0] for i in res], [gts[i] for i in gts]
    bleu = bleu_from_stats(bleu_stats(hyps, refs, tokenizer=None).sum(0))
    return {**{f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}, "cider": cider_d(hyps, refs)[0]}


def caption_prior_baseline(dm: CaptionDataModule, predictions: list[dict], candidates: int = 100,
                           fit_images: int = 300, tokenizer: str = "auto") -> float:
    """Test BLEU-4 of a model that never looks at the image: the one constant caption that scores best on (part
    of) the TRAINING images, chosen among the most frequent training captions, given to every test image.
    A captioner must beat this clearly to show that it uses the image at all. All text is tokenised once, as the
    evaluation tokenises it (each set in its own call)."""
    if not predictions:
        return 0.0
    train = list(tokenized_references([r.captions for r in dm.records["train"]], tokenizer).values())
    test = list(tokenized_references([p["references"] for p in predictions], tokenizer).values())
    pool = [c for c, _ in Counter(c for refs in train for c in refs).most_common(candidates)]
    fit = train[:fit_images]
    # sufficient statistics with the references cooked once: a full pycocoevalcap run per candidate is slow
    cooked = cook_references(fit, tokenizer=None)

    def train_bleu_4(caption: str) -> float:
        stats = bleu_stats([caption] * len(fit), fit, cooked=cooked, tokenizer=None)
        return float(bleu_from_stats(stats.sum(0))[3])

    best = max(pool, key=train_bleu_4)
    return caption_metrics([best] * len(test), test, meteor=False, tokenizer=None)["bleu_4"]


def reference_agreement(dataset_or_records: CaptionDataset | Iterable[CaptionRecord]) -> float:
    """Corpus BLEU-4 (0-1) of each image's first reference against its other references.

    A ceiling-like number for the references' wording variety: how well a perfect "one of the references"
    caption could score. Records with fewer than two captions are ignored. Scored as the test metrics are.
    """
    records = dataset_or_records.records if isinstance(dataset_or_records, CaptionDataset) else dataset_or_records
    records = [r for r in records if len(r.captions) >= 2]
    if not records:
        raise ValueError("reference_agreement needs at least one record with two or more captions")
    stats = bleu_stats([r.captions[0] for r in records], [r.captions[1:] for r in records])
    return float(bleu_from_stats(stats.sum(0))[3])
