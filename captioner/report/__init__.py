"""Comparison report over a Hydra multirun (`make sweep`): one table row per variant with paired-bootstrap
confidence intervals against the best variant, loss and BLEU-4 curves, and an HTML page with test images and every
variant's caption side by side (plus attention maps for the attention variant when `captioner.caption` exists).

usage: python experiments/compare.py SWEEP_DIR [--out DIR] [--bootstrap 1000] [--seed 0] [--html-images 12]

Writes report.md, report.html (self-contained), report.json, loss_curves.png and bleu_curves.png into
SWEEP_DIR/report/ (or --out).

Modules, in the order a report is built: `runs` (reading the sweep), `stats` (the paired bootstrap), `table`
(the table and report.md), `plots` (the curves), `html` (report.html).
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
from .plots import plot_curves
from .runs import ReportError, align_predictions, find_runs, read_run_files
from .stats import CI_LEVEL, best_run, paired_deltas, score_runs
from .table import build_table, legend_lines, render_markdown

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
    for run in runs:
        read_run_files(run)
    keys = align_predictions(runs)
    score_runs(runs, keys)
    best = best_run(runs)
    deltas = paired_deltas(runs, best, len(keys), n_boot, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = build_table(runs, deltas, best)
    prior = sorted({round(float(r.metrics["caption_prior_bleu_4"]), 6) for r in runs
                    if r.metrics.get("caption_prior_bleu_4") is not None})
    legend = legend_lines(len(keys), n_boot, seed, best, prior)
    figures = plot_curves(runs, out_dir)
    title = f"Comparison of {len(runs)} variants: {sweep_dir.resolve().name}"
    notes = [f"{r.label}: {n}" for r in runs for n in r.notes]
    atomic_write_text(out_dir / "report.md", render_markdown(title, sweep_dir, header, rows, legend, missing, notes,
                                                             figures))

    images, samples = sample_images(runs, best, keys, html_images)
    maps, map_notes = attention_maps_of(runs, images, samples)
    page = render_html(title, header, rows, legend + notes, missing, figures, samples, runs, maps, map_notes)
    atomic_write_text(out_dir / "report.html", page)

    report = {  # report.json: the same numbers as data
        "sweep_dir": str(sweep_dir.resolve()), "n_test_images": len(keys), "bootstrap": n_boot, "seed": seed,
        "ci_level": CI_LEVEL, "best": best.label,
        "caption_prior_bleu_4": prior[0] if len(prior) == 1 else (prior or None),
        "columns": header,
        "runs": [{
            "label": r.label, "run_dir": str(r.dir), "model": r.metrics.get("model"),
            "family": r.metrics.get("family"), "encoder": r.metrics.get("encoder"),
            "decoder": r.metrics.get("decoder"), "params_trainable": r.metrics.get("params_trainable"),
            "test": r.test, "best_epoch": r.metrics.get("best_epoch"),
            "train_seconds": r.metrics.get("train_seconds"), "is_best": r is best,
            "delta_vs_best": deltas.get(r.label), "notes": r.notes,
        } for r in runs],
        "missing": missing,
        "files": {"markdown": "report.md", "html": "report.html", **{k: p.name for k, p in figures.items()}},
    }
    atomic_write_text(out_dir / "report.json", json.dumps(_finite(report), indent=2, ensure_ascii=False))
    log.info("report of %d runs (%d missing) -> %s", len(runs), len(missing), out_dir)
    return report


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
    ap.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples of the test images")
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
