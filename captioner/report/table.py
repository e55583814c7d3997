"""The comparison table (one row per run, metrics.json's numbers and the paired-bootstrap deltas), its legend,
and the Markdown page around them."""

from __future__ import annotations

import math
from pathlib import Path

from .runs import Run

# header, metrics.json key, kind. Metric columns ("metric") are higher-is-better and get the column best in bold.
BASE_COLUMNS = [
    ("model", "label", "text"), ("encoder", "encoder", "text"), ("decoder", "decoder", "text"),
    ("params", "params_trainable", "int"),
    ("BLEU-1", "test.bleu_1", "metric"), ("BLEU-2", "test.bleu_2", "metric"), ("BLEU-3", "test.bleu_3", "metric"),
    ("BLEU-4", "test.bleu_4", "metric"), ("ROUGE-L", "test.rouge_l", "metric"), ("CIDEr", "test.cider", "metric"),
    ("METEOR", "test.meteor", "metric"),
]
SHAPES_COLUMNS = [("object acc.", "test.object_accuracy", "metric"),
                  ("relation acc.", "test.relation_accuracy", "metric")]
TAIL_COLUMNS = [("best epoch", "best_epoch", "int"), ("train s", "train_seconds", "seconds")]
DELTA_COLUMNS = [("ΔBLEU-4 vs best [95% CI]", "bleu_4"), ("ΔCIDEr vs best [95% CI]", "cider")]


def _value(run: Run, key: str):
    if key == "label":
        return run.label
    node = run.metrics
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "metric":
        return f"{value:.3f}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "seconds":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return str(value)


def _signed(x: float) -> str:
    # no "-0.000": a bound that rounds to zero would read as excluding 0 by a hair (float noise of the scorer)
    return "0.000" if round(x, 3) == 0 else f"{x:+.3f}"


def _fmt_delta(d: dict | None, is_best: bool) -> str:
    if is_best:
        return "best"
    if d is None:
        return "–"
    return f"{_signed(d['delta'])} [{_signed(d['lo'])}, {_signed(d['hi'])}]"


def build_table(runs: list[Run], deltas: dict[str, dict], best: Run) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of (text, bold) cells, shared by the Markdown and the HTML report."""
    columns = BASE_COLUMNS + [c for c in SHAPES_COLUMNS if any(_value(r, c[1]) is not None for r in runs)]
    columns += TAIL_COLUMNS
    best_of = {}
    for _, key, kind in columns:
        values = [v for v in (_value(r, key) for r in runs) if isinstance(v, (int, float)) and math.isfinite(v)]
        if kind == "metric" and values and len({_fmt(v, kind) for v in values}) > 1:  # all equal: nothing to mark
            best_of[key] = max(values)
    rows = []
    for run in runs:
        cells = []
        for _, key, kind in columns:
            v = _value(run, key)
            # compare the printed values, so equal-looking numbers are bold together
            bold = key in best_of and v is not None and _fmt(v, kind) == _fmt(best_of[key], kind)
            cells.append((_fmt(v, kind), bold))
        for _, name in DELTA_COLUMNS:
            cells.append((_fmt_delta(deltas.get(run.label, {}).get(name), run is best), False))
        rows.append(cells)
    return [c[0] for c in columns] + [c[0] for c in DELTA_COLUMNS], rows


def legend_lines(n_images: int, n_boot: int, seed: int, best: Run, prior: list[float]) -> list[str]:
    lines = [
        f"**Bold**: the best value of the column. Δ columns: the variant's test score minus that of the best variant "
        f"by test BLEU-4 (**{best.label}**), on the same {n_images} test images, with a 95% confidence interval from "
        f"a paired bootstrap ({n_boot} resamples of the test images drawn with replacement, seed {seed}; every "
        "variant is scored on the same resampled images; 2.5th–97.5th percentiles).",
        "How to read it: an interval that does not contain 0 is a real difference on this test set (larger than "
        "what the choice of test images explains); an interval containing 0 means this test set cannot tell the "
        "two variants apart. The intervals cover test-set sampling only, not training noise: another seed can "
        "move a score too.",
        "BLEU-4 is recomputed as exact corpus BLEU (pycocoevalcap's) on every resample. CIDEr is the mean of "
        "pycocoevalcap's per-image CIDEr-D, with document frequencies computed once from the full test set and "
        "kept fixed across resamples.",
    ]
    if prior:
        values = ", ".join(f"{p:.3f}" for p in prior)
        lines.append(f"Caption-prior baseline (the best constant training caption given to every test image, a "
                     f"model that ignores the image): test BLEU-4 {values}.")
    return lines


def _md_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if bold else text


def render_markdown(title: str, sweep_dir: Path, header: list[str], rows: list, legend: list[str],
                    missing: list[dict], notes: list[str], figures: dict[str, Path]) -> str:
    """report.md: the table, its legend, missing runs, notes and the curves (the PNGs next to it)."""
    md = [f"# {title}", "", f"Sweep: `{sweep_dir.resolve()}`", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_md_cell(t, b) for t, b in cells) + " |" for cells in rows]
    md += [""] + [line + "\n" for line in legend]
    if missing:
        md += ["## Missing runs", ""] + [f"- `{m['run']}`: {m['reason']}" for m in missing] + [""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Curves", "", f"![loss curves]({figures['loss'].name})", "", f"![validation BLEU-4]"
           f"({figures['bleu'].name})", "", "Test images with every variant's caption: `report.html`.", ""]
    return "\n".join(md)
