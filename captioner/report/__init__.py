"""Comparison report over a Hydra multirun (`make sweep`, or `python train.py -m model=a,b seed=1,2,3`): one
table row per variant (its runs over several seeds grouped: mean ± sd of every score), confidence intervals of its
difference to the best variant from a bootstrap over the test images (paired) and the seeds (hierarchical), loss and
BLEU-4 curves (mean over seeds, min–max band), and an HTML page with test images and every variant's caption side
by side (plus attention maps for the attention variant when `captioner.caption` exists).

usage: python experiments/compare.py SWEEP_DIR [--out DIR] [--bootstrap 1000] [--seed 0] [--html-images 12]

Writes report.md, report.html (self-contained), report.json, loss_curves.png and bleu_curves.png into
SWEEP_DIR/report/ (or --out).

Modules, in the order a report is built: `runs` (reading the sweep, grouping runs into variants), `stats` (seed
means and the bootstrap), `table` (the table and report.md), `plots` (the curves), `html` (report.html).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_text
from .html import attention_maps_of, render_html, sample_images
from .plots import BAND, plot_curves, seed_curve
from .runs import CURVES, ReportError, Variant, align_predictions, find_runs, group_variants, read_run_files
from .stats import CI_LEVEL, best_variant, hierarchical_deltas, score_runs, seed_summary
from .table import build_table, holding_up, legend_lines, render_markdown, table_columns

__all__ = ["ReportError", "build_report", "main"]

log = logging.getLogger(__name__)


def build_report(sweep_dir, out_dir=None, n_boot: int = 1000, seed: int = 0, html_images: int = 12) -> dict:
    """Write report.md / report.html / report.json / loss_curves.png / bleu_curves.png; return report.json's
    content."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    if n_boot < 1:
        raise ReportError(f"--bootstrap must be at least 1 (got {n_boot})")
    runs, missing = find_runs(sweep_dir, out_dir)
    variants = group_variants(runs)
    for run in runs:
        read_run_files(run)
    keys = align_predictions(runs)  # every seed of every variant: one test set
    score_runs(runs, keys)
    best = best_variant(variants)
    deltas = hierarchical_deltas(variants, best, len(keys), n_boot, seed)
    flags = holding_up(variants, deltas, best)

    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = build_table(variants, deltas, best)
    prior = sorted({round(float(r.metrics["caption_prior_bleu_4"]), 6) for r in runs
                    if r.metrics.get("caption_prior_bleu_4") is not None})
    several = any(len(v.runs) > 1 for v in variants)
    legend = legend_lines(len(keys), n_boot, seed, best, prior, variants, deltas, table_columns(variants))
    figures = plot_curves(variants, out_dir)
    if several:
        legend.append(f"Curves: the line is the mean over a variant's seeds, the shaded band spans {BAND} (at each "
                      "epoch, over the seeds that logged it); ★ marks each seed's tested checkpoint.")
    title = (f"Comparison of {len(variants)} variants ({len(runs)} runs): {sweep_dir.resolve().name}" if several
             else f"Comparison of {len(runs)} variants: {sweep_dir.resolve().name}")
    notes = [f"{r.label}: {n}" for r in runs for n in r.notes]
    atomic_write_text(out_dir / "report.md", render_markdown(title, sweep_dir, header, rows, legend, missing, notes,
                                                             figures))

    # one run's captions per variant: the first seed that has predictions (captions differ from seed to seed)
    shown = [next((r for r in v.runs if r.predictions is not None), v.first) for v in variants]
    caption_note = ("A variant with several seeds is shown by the captions (and attention maps) of one run, its "
                    "first seed with predictions, named beside the caption; the table's scores are over all its "
                    "seeds.") if several else None
    images, samples = sample_images(shown, shown[variants.index(best)], keys, html_images)
    maps, map_notes = attention_maps_of(shown, images, samples)
    page = render_html(title, header, rows, legend + notes, missing, figures, samples, shown, maps, map_notes,
                       caption_note)
    atomic_write_text(out_dir / "report.html", page)

    report = {  # report.json: the same numbers as data; "runs" holds one entry per variant (its seeds inside)
        "sweep_dir": str(sweep_dir.resolve()), "n_test_images": len(keys), "bootstrap": n_boot, "seed": seed,
        "ci_level": CI_LEVEL, "best": best.label,
        "interval": "hierarchical bootstrap (test images paired across variants, seeds per variant)" if several
                    else "paired bootstrap of the test images",
        "caption_prior_bleu_4": prior[0] if len(prior) == 1 else (prior or None),
        "columns": header,
        "runs": [_variant_entry(v, v is best, deltas.get(v.label), flags[v.label], shown[i])
                 for i, v in enumerate(variants)],
        "curve_band": BAND,
        "curves": {v.label: {key: seed_curve(v, key) for key in CURVES} for v in variants},
        "missing": missing,
        "files": {"markdown": "report.md", "html": "report.html", **{k: p.name for k, p in figures.items()}},
    }
    atomic_write_text(out_dir / "report.json", json.dumps(_finite(report), indent=2, ensure_ascii=False))
    log.info("report of %d variants, %d runs (%d missing) -> %s", len(variants), len(runs), len(missing), out_dir)
    return report


def _variant_entry(variant: Variant, is_best: bool, delta: dict | None, flags: dict, shown) -> dict:
    """report.json's record of one variant: its seed means (and sds) and each seed's own record."""
    m = variant.metrics
    test_keys = list(dict.fromkeys(k for r in variant.runs for k in r.test))
    summaries = {k: seed_summary([r.test.get(k) for r in variant.runs]) for k in test_keys}
    return {
        "label": variant.label, "model": m.get("model"), "family": m.get("family"), "encoder": m.get("encoder"),
        "decoder": m.get("decoder"), "params_trainable": m.get("params_trainable"),
        "n_seeds": len(variant.runs), "seeds": variant.seeds,
        "run_dir": str(shown.dir),  # the run whose captions report.html shows
        "test": {k: s[0] for k, s in summaries.items()},  # mean over seeds (one seed: its value)
        "test_sd": {k: s[1] for k, s in summaries.items()},  # sample sd over seeds (null with one seed)
        "best_epoch": m.get("best_epoch") if len(variant.runs) == 1 else None,  # per seed: "seed_runs"
        "train_seconds": seed_summary([r.metrics.get("train_seconds") for r in variant.runs])[0],  # mean
        "is_best": is_best, "delta_vs_best": delta, "holds_up": flags,
        "notes": [f"{r.label}: {n}" if len(variant.runs) > 1 else n for r in variant.runs for n in r.notes],
        "seed_runs": [{"seed": r.seed, "run_dir": str(r.dir), "test": r.test, "best_epoch": r.metrics.get("best_epoch"),
                       "train_seconds": r.metrics.get("train_seconds"), "has_predictions": r.stats is not None}
                      for r in variant.runs],
    }


def _finite(obj):
    """NaN/inf -> null: json.dumps would write them as bare NaN, which is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    """The command line of experiments/compare.py; returns its exit status (2: a sweep it cannot report on)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\nModules,")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path, help="a multirun directory: one subdirectory per run")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP_DIR/report)")
    ap.add_argument("--bootstrap", type=int, default=1000,
                    help="bootstrap resamples (of the test images, and of each variant's seeds where it has several)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    ap.add_argument("--html-images", type=int, default=12, help="test images shown in report.html")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[compare] %(message)s")
    try:
        report = build_report(args.sweep_dir, args.out, n_boot=args.bootstrap, seed=args.seed,
                              html_images=args.html_images)
    except (ReportError, UserError) as e:  # UserError: a full disk, named with the report file
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "report"
    print(f"[compare] {len(report['runs'])} variants ({len(report['missing'])} missing), best by test BLEU-4: "
          f"{report['best']} -> {out / 'report.md'}, {out / 'report.html'}")
    return 0
