"""Reading a sweep: its finished runs (metrics.json, predictions.jsonl, the CSV logger's curves) and the missing
ones, in the variants' order, checked to be comparable image by image, and grouped into variants: the runs of one
variant differ only in their training seed (`python train.py -m model=a,b seed=1,2,3`)."""

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
    seed: int | None = None  # the training seed: metrics.json's, else .hydra/config.yaml's
    overrides: list[str] | None = None  # .hydra/overrides.yaml (the job's command-line overrides), when there

    @property
    def test(self) -> dict:
        return self.metrics.get("test") or {}


@dataclass
class Variant:
    """One row of the report: the runs of one model (and any other non-seed override) over its seeds, in seed
    order."""
    label: str
    runs: list[Run]

    @property
    def first(self) -> Run:
        """The run that stands for the variant where one must (captions, attention maps): its first seed."""
        return self.runs[0]

    @property
    def metrics(self) -> dict:
        return self.first.metrics

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def scored(self) -> list[Run]:
        """The runs with per-image scores (a predictions.jsonl), which the intervals resample."""
        return [r for r in self.runs if r.stats is not None]


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
                metrics = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                missing.append({"run": d.name, "reason": f"unreadable metrics.json ({e})"})
                continue
            overrides = _read_overrides(d)
            runs.append(Run(dir=d, metrics=metrics, seed=_read_seed(d, metrics, overrides), overrides=overrides))
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
    return runs, missing


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        value = yaml.safe_load(path.read_text())
    except Exception:  # a damaged Hydra record: fall back to the job dir's name, as without one
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _read_seed(run_dir: Path, metrics: dict, overrides: list[str] | None) -> int | None:
    """metrics.json's seed (train.py records it), else .hydra/config.yaml's top-level `seed` (runs written
    before it did), else a `seed=` override."""
    if _is_int(metrics.get("seed")):
        return metrics["seed"]
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        try:
            import yaml

            seed = (yaml.safe_load(config.read_text()) or {}).get("seed")
            if _is_int(seed):
                return seed
        except Exception:  # unreadable or not a mapping: the override or nothing
            pass
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "seed" and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
    return None


def _variant_parts(run: Run) -> tuple[str, ...]:
    """What tells a run's variant apart besides its model: its overrides other than the model and the seed.
    From .hydra/overrides.yaml, else from the job dir's name (`<n>_<key>=<value>,...`, where Hydra's
    override_dirname may separate key and value by '-' instead of '=')."""
    if run.overrides is not None:
        items = [(o.partition("=")[0].lstrip("+~"), o) for o in run.overrides]
    else:
        name = re.sub(r"^\d+_", "", run.dir.name)
        items = [(re.split(r"[=-]", o, maxsplit=1)[0], o) for o in name.split(",") if o]
    # init_from: stage=scst starts each seed from its own cross-entropy run, which makes it no other variant
    return tuple(sorted(o for key, o in items if key not in ("model", "seed", "init_from")))


def group_variants(runs: list[Run]) -> list[Variant]:
    """The runs grouped by variant (model + non-seed overrides), in the order of their first run, each variant's
    runs in seed order. Label = the model name; where a sweep trains one model several ways (e.g. over lr), the
    differing overrides are added to tell the rows apart. Runs of a variant with several seeds are labelled
    `<variant> (seed <s>)` in notes and captions."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.metrics.get("model") or run.dir.name, _variant_parts(run)), []).append(run)
    models = [model for model, _ in groups]
    variants = []
    for (model, parts), members in groups.items():
        # a stable sort: runs without a seed after the seeded ones, in job order
        members.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
        label = model if models.count(model) == 1 else f"{model} ({', '.join(parts)})" if parts else model
        variant = Variant(label=label, runs=members)
        for run in members:
            run.label = label if len(members) == 1 else f"{label} (seed {run.seed if run.seed is not None else '?'})"
        seeds = [s for s in variant.seeds if s is not None]
        if len(set(seeds)) < len(seeds):  # two runs of one seed still count twice, but the user should know
            members[0].notes.append(f"seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} appear more than "
                                    "once among this variant's runs; each run counts as one seed")
        variants.append(variant)
    return variants


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
