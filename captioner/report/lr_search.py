"""The learning-rate search of the comparison (`make search`): every variant trained at the same few learning rates,
each chosen by its best VALIDATION BLEU-4. Test scores are never read here, so nothing is chosen on the test set.

usage: python experiments/lr_search.py SWEEP_DIR [--out FILE.md]

Reads each run of the sweep (`<job>/metrics.json` for the model and its best validation BLEU-4,
`<job>/.hydra/config.yaml` for the learning rate and seed) and prints, and writes as markdown and JSON, one row
per variant: its validation BLEU-4 at every learning rate and the chosen one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_text


class SearchError(UserError):
    """A sweep that cannot be summarised: the message names the directory and what is missing."""


def read_search(sweep_dir: Path) -> list[dict]:
    """One dict per finished run: model, variant, lr, seed, best_val_bleu_4, best_epoch (unfinished runs are left
    out: a run writes metrics.json last)."""
    from omegaconf import OmegaConf

    runs = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
        config_file = metrics_file.parent / ".hydra" / "config.yaml"
        if not config_file.is_file():
            raise SearchError(f"{config_file}: missing; is {metrics_file.parent} a Hydra job of the search?")
        metrics = json.loads(metrics_file.read_text())
        cfg = OmegaConf.load(config_file)
        value = metrics.get("best_val_bleu_4")
        runs.append({"model": metrics["model"], "variant": OmegaConf.select(cfg, "model.variant"),
                     "lr": float(cfg.optimizer.lr), "seed": cfg.seed,
                     "best_val_bleu_4": float(value) if value is not None and math.isfinite(value) else 0.0,
                     "best_epoch": metrics.get("best_epoch"), "run_dir": str(metrics_file.parent)})
    return runs


def choose(runs: list[dict]) -> list[dict]:
    """Per variant (in variant order): validation BLEU-4 by learning rate (mean over seeds where several) and the
    learning rate with the highest; a tie goes to the smaller rate."""
    by_model: dict[str, dict] = {}
    for r in runs:
        row = by_model.setdefault(r["model"], {"model": r["model"], "variant": r["variant"], "scores": {}})
        row["scores"].setdefault(r["lr"], []).append(r["best_val_bleu_4"])
    rows = []
    for row in sorted(by_model.values(), key=lambda x: (x["variant"] is None, x["variant"] or 0, x["model"])):
        scores = {lr: sum(v) / len(v) for lr, v in sorted(row["scores"].items())}
        best = max(scores, key=lambda lr: (round(scores[lr], 9), -lr))  # equal up to float error: a tie
        rows.append({"model": row["model"], "variant": row["variant"], "val_bleu_4": scores, "chosen_lr": best,
                     "at_grid_edge": len(scores) > 1 and best in (min(scores), max(scores))})
    return rows


def render(rows: list[dict], sweep_dir: Path) -> str:
    rates = sorted({lr for row in rows for lr in row["val_bleu_4"]})
    lines = [f"# Learning-rate search: {Path(sweep_dir).resolve().name}", "",
             "Best validation BLEU-4 of each run (its best epoch), by learning rate; **bold** the chosen one. "
             "Test scores were not read.", "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
             "|---|" + "---|" * (len(rates) + 1)]
    for row in rows:
        cells = []
        for lr in rates:
            v = row["val_bleu_4"].get(lr)
            cell = "–" if v is None else f"{v:.3f}"
            cells.append(f"**{cell}**" if lr == row["chosen_lr"] else cell)
        edge = " (grid edge)" if row["at_grid_edge"] else ""
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {row['chosen_lr']:g}{edge} |")
    if any(row["at_grid_edge"] for row in rows):
        lines += ["", "A choice at the grid's edge may be bettered outside it: widen the grid (`LR_GRID=`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lr_search.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default SWEEP_DIR/lr_search.md); JSON beside it")
    args = parser.parse_args(argv)
    try:
        runs = read_search(args.sweep_dir)
        if not runs:
            raise SearchError(f"{args.sweep_dir}: no finished runs (no */metrics.json)")
        rows = choose(runs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "lr_search.md"
    text = render(rows, args.sweep_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"sweep": str(args.sweep_dir), "runs": runs,
                                                            "choices": rows}, indent=2, default=str))
    print(text, end="")
    return 0
