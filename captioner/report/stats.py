"""The bootstrap of the report: every variant's test score resampled over the SAME resamples of the test images
(paired) and, where a variant has several seeds, over resamples of its seeds (hierarchical), and its difference
from the best variant with a percentile confidence interval; and the mean ± sd of a variant's seeds."""

from __future__ import annotations

import logging

import numpy as np

from ..scoring.bootstrap import bleu_from_stats, bleu_stats
from ..scoring.metrics import caption_metrics
from ..scoring.ptb import evaluation_texts
from .runs import Run, Variant

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


def seed_summary(values) -> tuple[float | None, float | None, int]:
    """(mean, sample sd (ddof=1), n) of a variant's per-seed values, the finite numbers among them; sd is None
    with fewer than 2 values (no spread to estimate), mean None with none."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)]
    if not xs:
        return None, None, 0
    if len(xs) == 1:  # that value exactly, not a float mean of it: a one-seed report prints today's numbers
        return xs[0], None, 1
    return float(np.mean(xs)), float(np.std(xs, ddof=1)), len(xs)


def best_variant(variants: list[Variant]) -> Variant:
    """The variant with the best mean test BLEU-4 over its seeds as recorded; the first variant wins a tie."""
    def key(v: Variant) -> float:
        mean = seed_summary([r.test.get("bleu_4") for r in v.runs])[0]
        return mean if mean is not None else -1.0

    return max(variants, key=key)


def seed_draws(n_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_seeds) indices of a variant's seeds drawn with replacement in each resample."""
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def mean_over_drawn_seeds(per_run: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """per_run (n_boot, n_seeds): each run's score on each image resample; draws (n_boot, n_seeds): the seeds of
    each resample -> (n_boot,) the variant's resampled score, the mean over its drawn seeds."""
    return np.take_along_axis(per_run, draws, axis=1).mean(axis=1)


def _full_bleu_4(run: Run) -> float:
    return float(bleu_from_stats(run.stats.sum(0))[3])


def hierarchical_deltas(variants: list[Variant], best: Variant, n_images: int, n_boot: int,
                        seed: int) -> dict[str, dict]:
    """{variant label: {"bleu_4": delta_ci, "cider": delta_ci}} of every scored variant against `best`; empty when
    the best variant has no predictions to resample.

    Each resample draws the test images with replacement (one count matrix for every variant: paired) and,
    independently per variant, its seeds with replacement; the variant's score is the mean over its drawn seeds
    of each drawn run's score on the drawn images. Vectorised: every run's (n_boot,) scores come from the shared
    counts once, the seed draws then only index them. The point estimate is the difference of the seed means on
    the full test set. With one seed per variant the draws are all 0, and this is the paired bootstrap exactly."""
    deltas: dict[str, dict] = {}
    if not best.scored or not n_images:
        return deltas
    counts = bootstrap_counts(n_images, n_boot, seed)
    resampled, full = {}, {}
    for i, variant in enumerate(variants):
        runs = variant.scored
        if not runs:
            continue
        # its own stream per variant (independent seed draws), apart from the image counts' stream of `seed`
        draws = seed_draws(len(runs), n_boot, np.random.default_rng([seed, 1, i]))
        bleu = np.stack([resampled_bleu_4(r.stats, counts) for r in runs], axis=1)
        cider = np.stack([resampled_mean(r.cider, counts) for r in runs], axis=1)
        resampled[variant.label] = {"bleu_4": mean_over_drawn_seeds(bleu, draws),
                                    "cider": mean_over_drawn_seeds(cider, draws)}
        # sum/len: one seed gives its own score exactly, so one seed reproduces the paired bootstrap bit for bit
        full[variant.label] = {"bleu_4": sum(_full_bleu_4(r) for r in runs) / len(runs),
                               "cider": sum(float(r.cider.mean()) for r in runs) / len(runs)}
    ref = best.label
    for label in resampled:
        deltas[label] = {m: delta_ci(resampled[label][m], resampled[ref][m], full[label][m], full[ref][m])
                         for m in ("bleu_4", "cider")}
    return deltas


def holds_up(ci: dict | None) -> bool | None:
    """Whether a difference holds up: its interval excludes 0 (beyond float noise of the scorer); None without
    an interval."""
    if ci is None:
        return None
    return bool(ci["lo"] > 1e-9 or ci["hi"] < -1e-9)
