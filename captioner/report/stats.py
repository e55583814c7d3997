"""The paired bootstrap: every variant's test score resampled over the SAME resamples of the test images, and
its difference from the best variant with a percentile confidence interval."""

from __future__ import annotations

import logging

import numpy as np

from ..scoring.bootstrap import bleu_from_stats, bleu_stats
from ..scoring.metrics import caption_metrics
from ..scoring.ptb import evaluation_texts
from .runs import Run

log = logging.getLogger(__name__)

CI_LEVEL = 0.95


def bootstrap_counts(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_images) how often each test image is drawn in each resample (with replacement). The SAME
    matrix is applied to every variant: that pairing is what cancels the per-image difficulty shared by both."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_images, size=(n_boot, n_images))
    flat = (np.arange(n_boot)[:, None] * n_images + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n_images).reshape(n_boot, n_images).astype(np.float64)


def resampled_bleu_4(stats: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact corpus BLEU-4 of every resample: summed sufficient statistics, one vectorised formula."""
    return bleu_from_stats(counts @ stats)[:, 3]


def resampled_mean(per_image: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return counts @ per_image / counts.shape[1]


def delta_ci(resampled: np.ndarray, resampled_ref: np.ndarray, full: float, full_ref: float,
             level: float = CI_LEVEL) -> dict:
    """Point difference on the full test set and the percentile CI of the paired resampled differences."""
    d = resampled - resampled_ref
    lo, hi = np.percentile(d, [50 * (1 - level), 50 * (1 + level)])
    return {"delta": float(full - full_ref), "lo": float(lo), "hi": float(hi)}


def score_runs(runs: list[Run], keys: list[str]) -> None:
    """Per-image BLEU statistics and CIDEr-D of every run, in the order of `keys`. CIDEr-D's document frequencies
    come from the references of the full test set (pycocoevalcap computes them per call) and stay fixed under
    resampling. The text is tokenised once per run, as the runs' own test metrics tokenised it."""
    for run in runs:
        if run.predictions is None:
            continue
        rows = [run.predictions[k] for k in keys]
        gts, res = evaluation_texts([r["hypothesis"] for r in rows], [r["references"] for r in rows])
        hyps, refs = [res[i][0] for i in res], [gts[i] for i in gts]
        run.stats = bleu_stats(hyps, refs, tokenizer=None)
        scores = caption_metrics(hyps, refs, meteor=False, per_image=True, tokenizer=None)
        run.cider = np.asarray(scores["per_image"]["cider"], dtype=np.float64)
        # the table shows metrics.json, the intervals come from predictions.jsonl: say so if they disagree
        for name, value in (("bleu_4", float(bleu_from_stats(run.stats.sum(0))[3])), ("cider", scores["cider"])):
            recorded = run.test.get(name)
            if recorded is not None and abs(recorded - value) > 1e-6:
                msg = (f"predictions.jsonl gives test {name} {value:.4f} but metrics.json says {recorded:.4f}; "
                       "the Δ columns use predictions.jsonl")
                log.warning("%s: %s", run.label, msg)
                run.notes.append(msg)


def best_run(runs: list[Run]) -> Run:
    """The run with the best test BLEU-4 as recorded; the first run wins a tie."""
    return max(runs, key=lambda r: (r.test.get("bleu_4") if r.test.get("bleu_4") is not None else -1.0))


def paired_deltas(runs: list[Run], best: Run, n_images: int, n_boot: int, seed: int) -> dict[str, dict]:
    """{run label: {"bleu_4": delta_ci, "cider": delta_ci}} of every scored run against `best`; empty when the
    best run has no predictions to resample."""
    deltas: dict[str, dict] = {}
    if best.stats is None or not n_images:
        return deltas
    counts = bootstrap_counts(n_images, n_boot, seed)
    ref_bleu, ref_cider = resampled_bleu_4(best.stats, counts), resampled_mean(best.cider, counts)
    full_bleu = lambda r: float(bleu_from_stats(r.stats.sum(0))[3])  # noqa: E731
    for run in runs:
        if run.stats is None:
            continue
        deltas[run.label] = {
            "bleu_4": delta_ci(resampled_bleu_4(run.stats, counts), ref_bleu, full_bleu(run), full_bleu(best)),
            "cider": delta_ci(resampled_mean(run.cider, counts), ref_cider, float(run.cider.mean()),
                              float(best.cider.mean())),
        }
    return deltas
