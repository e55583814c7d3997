"""Reading a sweep: its finished runs (metrics.json, predictions.jsonl, the CSV logger's curves) and the missing
ones, in the variants' order, checked to be comparable image by image."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CURVES = ("train/loss_epoch", "val/loss", "val/bleu_4")


class ReportError(RuntimeError):
    """A sweep directory the report cannot be built from; the message says why and what to do."""


@dataclass
class Run:
    dir: Path
    metrics: dict
    label: str = ""
    predictions: dict[str, dict] | None = None  # image key -> predictions.jsonl row
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stats: np.ndarray | None = None  # (n_images, 10) BLEU sufficient statistics, in the report's image order
    cider: np.ndarray | None = None  # (n_images,) per-image CIDEr-D, same order
    notes: list[str] = field(default_factory=list)

    @property
    def test(self) -> dict:
        return self.metrics.get("test") or {}


def variant_order() -> list[str]:
    """The variants in their numbered order (1-5), which the report's rows follow."""
    from ..config import variants

    return variants()


def _job_number(path: Path) -> tuple[int, str]:
    m = re.match(r"(\d+)", path.name)  # Hydra job dirs are `<n>_<overrides>`: sort 2 before 10
    return (int(m.group(1)) if m else 1 << 30, path.name)


def find_runs(sweep_dir: Path, out_dir: Path | None = None) -> tuple[list[Run], list[dict]]:
    """Finished runs (a metrics.json) and missing ones (a job dir without it: crashed, killed or still running)."""
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory; pass a multirun sweep dir, e.g. multirun/<time>/")
    if (sweep_dir / "metrics.json").exists():
        raise ReportError(f"{sweep_dir} is a single run (it has its own metrics.json); pass the multirun directory "
                          "that holds one subdirectory per run, e.g. multirun/<time>/")
    runs, missing = [], []
    for d in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=_job_number):
        if d.name.startswith(".") or (out_dir is not None and d.resolve() == out_dir.resolve()):
            continue
        path = d / "metrics.json"
        if path.exists():
            try:
                runs.append(Run(dir=d, metrics=json.loads(path.read_text())))
            except json.JSONDecodeError as e:
                missing.append({"run": d.name, "reason": f"unreadable metrics.json ({e})"})
        elif re.match(r"\d+(_|$)", d.name) or (d / ".hydra").is_dir():  # a Hydra job dir, not some other folder
            missing.append({"run": d.name, "reason": "no metrics.json (crashed, killed or still running; "
                                                     "see its train.log)"})
    if not runs:
        found = f"; job dirs without metrics.json: {', '.join(m['run'] for m in missing)}" if missing else ""
        raise ReportError(f"no finished run (<run>/metrics.json) under {sweep_dir}{found}. Pass the directory "
                          "of a `python train.py -m ...` sweep (multirun/<time>/) whose runs have finished.")
    # The variants in their numbered order, whatever order the sweep ran them in (`make demo` starts the longest
    # first); other runs after them, in job order (a stable sort).
    order = variant_order()
    runs.sort(key=lambda r: order.index(r.metrics.get("model")) if r.metrics.get("model") in order else len(order))
    _label_runs(runs)
    return runs, missing


def _label_runs(runs: list[Run]) -> None:
    """Label = the model name; where a sweep trains one model several times (e.g. over lr), the run dir's
    overrides tell the rows apart."""
    models = [r.metrics.get("model") or r.dir.name for r in runs]
    for run, model in zip(runs, models):
        run.label = model if models.count(model) == 1 else re.sub(r"^\d+_", "", run.dir.name) or run.dir.name


def read_predictions(path: Path) -> dict[str, dict]:
    rows = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{line_no}: not JSON ({e}); was the run killed while writing it?") from None
            lacking = {"image", "hypothesis", "references"} - set(row if isinstance(row, dict) else ())
            if lacking:
                raise ReportError(f"{path}:{line_no}: a predictions row needs image, hypothesis and references "
                                  f"(as train.py writes them); missing {sorted(lacking)}")
            if row["image"] in rows:
                raise ReportError(f"{path}:{line_no}: image {row['image']!r} appears twice; predictions must have "
                                  "one row per test image")
            rows[row["image"]] = row
    return rows


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch values of CURVES from Lightning's CSVLogger file. Its rows are sparse (each logging call fills
    only its own columns), so every column is collected on its own; the last value of an epoch wins (a resumed
    run re-logs the epoch it resumed in)."""
    per_epoch: dict[str, dict[int, float]] = {k: {} for k in CURVES}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if not epoch:
                continue
            for key in CURVES:
                value = row.get(key)
                if value not in (None, ""):
                    per_epoch[key][int(float(epoch))] = float(value)
    return {k: sorted(v.items()) for k, v in per_epoch.items()}


def read_run_files(run: Run) -> None:
    """Fill a run's predictions and curves from its directory; what is absent becomes a note of the report."""
    preds = run.dir / "predictions.jsonl"
    if preds.exists():
        run.predictions = read_predictions(preds)
    else:
        run.notes.append("no predictions.jsonl: no confidence intervals or captions for this run")
    curves = run.dir / "csv" / "metrics.csv"
    if curves.exists():
        run.curves = read_curves(curves)
    else:
        run.notes.append("no csv/metrics.csv (logger=none?): no curves for this run")


def align_predictions(runs: list[Run]) -> list[str]:
    """The common test image keys (sorted). Variants are compared image by image, so all runs must have
    predicted the same test images; anything else is refused."""
    with_preds = [r for r in runs if r.predictions is not None]
    if not with_preds:
        return []
    keys = set(with_preds[0].predictions)
    for run in with_preds[1:]:
        other = set(run.predictions)
        if other != keys:
            only_a, only_b = sorted(keys - other), sorted(other - keys)
            raise ReportError(
                f"runs {with_preds[0].dir.name} ({len(keys)} test images) and {run.dir.name} ({len(other)}) did not "
                f"predict the same test images: {len(only_a)} only in the first (e.g. {only_a[:3]}), {len(only_b)} "
                f"only in the second (e.g. {only_b[:3]}). A paired comparison needs one test set: compare runs of "
                "one sweep over the same data config.")
    return sorted(keys)
