"""The comparison table (one row per variant: metrics.json's numbers as mean ± sd over its seeds, and the
bootstrap deltas), its legend, and the Markdown page around them."""

from __future__ import annotations

import math
from pathlib import Path

from .runs import Variant
from .stats import holds_up, seed_summary

# header, metrics.json key, kind. Metric columns ("metric") are higher-is-better and get the column best in bold;
# "rate" columns are printed alike but never bold, since stating more is not better by itself.
BASE_COLUMNS = [
    ("model", "label", "text"), ("encoder", "encoder", "text"), ("decoder", "decoder", "text"),
    ("params", "params_trainable", "int"),
    ("BLEU-1", "test.bleu_1", "metric"), ("BLEU-2", "test.bleu_2", "metric"), ("BLEU-3", "test.bleu_3", "metric"),
    ("BLEU-4", "test.bleu_4", "metric"), ("ROUGE-L", "test.rouge_l", "metric"), ("CIDEr", "test.cider", "metric"),
    ("METEOR", "test.meteor", "metric"),
]
SEEDS_COLUMN = ("seeds", "n_seeds", "int")
# the shapes world's semantic scores, each accuracy beside its rate; shown only when some run recorded them
SHAPES_COLUMNS = [("object acc.", "test.object_accuracy", "metric"),
                  ("relation acc.", "test.relation_accuracy", "metric"),
                  ("relation rate", "test.relation_rate", "rate"),
                  ("relation correct", "test.relation_correct", "metric"),
                  ("direction acc.", "test.direction_accuracy", "metric"),
                  ("size acc.", "test.size_accuracy", "metric"),
                  ("size rate", "test.size_rate", "rate")]
SHAPES_LEGEND = {  # what the semantic columns count, one line each (captioner/scoring/semantic.py)
    "test.object_accuracy": "object acc.: share of captions whose mentioned (colour, shape) objects are exactly "
                            "the scene's.",
    "test.relation_accuracy": "relation acc.: among captions of multi-object scenes that state a relation, the "
                              "share whose relations are all right (right objects, right direction).",
    "test.relation_rate": "relation rate: share of multi-object scenes whose caption states a relation at all.",
    "test.relation_correct": "relation correct: share of multi-object scenes whose caption states only correct "
                             "relations (relation acc. × relation rate: a caption stating none counts as wrong).",
    "test.direction_accuracy": "direction acc.: among stated relations between two distinct scene objects, the "
                               "share with the right direction (relations judged apart from object recognition).",
    "test.size_accuracy": "size acc.: among mentions of scene objects that state a size, the share with the right "
                          "size.",
    "test.size_rate": "size rate: share of mentions of scene objects that state a size at all.",
}
TAIL_COLUMNS = [("best epoch", "best_epoch", "int"), ("train s", "train_seconds", "seconds")]
DELTA_COLUMNS = [("ΔBLEU-4 vs best [95% CI]", "bleu_4"), ("ΔCIDEr vs best [95% CI]", "cider")]
NUMBER = ("metric", "rate")


def _value(metrics: dict, key: str):
    node = metrics
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _values(variant: Variant, key: str) -> list:
    """The column's value for each of the variant's seeds."""
    if key == "label":
        return [variant.label]
    if key == "n_seeds":
        return [len(variant.runs)]
    return [_value(r.metrics, key) for r in variant.runs]


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind in NUMBER:
        return f"{value:.3f}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "seconds":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return str(value)


def _cell(variant: Variant, key: str, kind: str) -> tuple[str, float | None]:
    """(text, the number bold-marking compares) of one cell over the variant's seeds: metrics as mean ± sd
    (one seed: the value alone, as a one-run report), counts as their range, seconds as their mean."""
    values = _values(variant, key)
    if kind == "text":
        distinct = list(dict.fromkeys(str(v) for v in values if v is not None))
        return ("/".join(distinct) or "–"), None
    mean, sd, n = seed_summary(values)
    if mean is None:
        return "–", None
    if kind in NUMBER:
        text = _fmt(mean, kind) + (f" ± {sd:.3f}" if sd is not None else "")
        if n < len(variant.runs):  # a seed without this score (e.g. no Java for METEOR): say over how many
            text += f" (n={n})"
        return text, mean
    if kind == "int":
        numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        lo, hi = min(numbers), max(numbers)
        return (_fmt(lo, kind) if lo == hi else f"{_fmt(lo, kind)}–{_fmt(hi, kind)}"), None
    return _fmt(mean, kind), mean


def _signed(x: float) -> str:
    # no "-0.000": a bound that rounds to zero would read as excluding 0 by a hair (float noise of the scorer)
    return "0.000" if round(x, 3) == 0 else f"{x:+.3f}"


def _fmt_delta(d: dict | None, is_best: bool) -> str:
    if is_best:
        return "best"
    if d is None:
        return "–"
    return f"{_signed(d['delta'])} [{_signed(d['lo'])}, {_signed(d['hi'])}]"


def table_columns(variants: list[Variant]) -> list[tuple[str, str, str]]:
    """The columns of this sweep: the seeds column only where some variant has several (a one-seed sweep's
    table is the one-run table), semantic columns only where some run recorded them."""
    columns = BASE_COLUMNS[:4]
    if any(len(v.runs) > 1 for v in variants):
        columns = columns + [SEEDS_COLUMN]
    columns = columns + BASE_COLUMNS[4:]
    columns += [c for c in SHAPES_COLUMNS if any(_value(r.metrics, c[1]) is not None for v in variants
                                                 for r in v.runs)]
    return columns + TAIL_COLUMNS


def build_table(variants: list[Variant], deltas: dict[str, dict],
                best: Variant) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of (text, bold) cells, shared by the Markdown and the HTML report."""
    columns = table_columns(variants)
    cells = {v.label: [_cell(v, key, kind) for _, key, kind in columns] for v in variants}
    best_of = {}
    for j, (_, key, kind) in enumerate(columns):
        means = [cells[v.label][j][1] for v in variants if cells[v.label][j][1] is not None]
        if kind == "metric" and means and len({_fmt(m, kind) for m in means}) > 1:  # all equal: nothing to mark
            best_of[j] = _fmt(max(means), kind)
    rows = []
    for variant in variants:
        row = []
        for j, (text, mean) in enumerate(cells[variant.label]):
            # compare the printed means, so equal-looking numbers are bold together
            row.append((text, j in best_of and mean is not None and _fmt(mean, columns[j][2]) == best_of[j]))
        for _, name in DELTA_COLUMNS:
            row.append((_fmt_delta(deltas.get(variant.label, {}).get(name), variant is best), False))
        rows.append(row)
    return [c[0] for c in columns] + [c[0] for c in DELTA_COLUMNS], rows


def holding_up(variants: list[Variant], deltas: dict[str, dict], best: Variant) -> dict[str, dict]:
    """{label: {"bleu_4": bool, "cider": bool}}: whether the difference to the best variant holds up (its
    interval excludes 0); None where there is no interval, False for the best itself (Δ is 0)."""
    return {v.label: {name: holds_up(deltas.get(v.label, {}).get(name)) for _, name in DELTA_COLUMNS}
            for v in variants}


def legend_lines(n_images: int, n_boot: int, seed: int, best: Variant, prior: list[float],
                 variants: list[Variant] | None = None, deltas: dict[str, dict] | None = None,
                 columns: list[tuple[str, str, str]] | None = None) -> list[str]:
    variants, deltas, columns = variants or [best], deltas or {}, columns or []
    several = any(len(v.runs) > 1 for v in variants)
    if not several:
        lines = [
            f"**Bold**: the best value of the column. Δ columns: the variant's test score minus that of the best "
            f"variant by test BLEU-4 (**{best.label}**), on the same {n_images} test images, with a 95% confidence "
            f"interval from a paired bootstrap ({n_boot} resamples of the test images drawn with replacement, seed "
            f"{seed}; every variant is scored on the same resampled images; 2.5th–97.5th percentiles).",
            "How to read it: an interval that does not contain 0 is a real difference on this test set (larger than "
            "what the choice of test images explains); an interval containing 0 means this test set cannot tell the "
            "two variants apart. The intervals cover test-set sampling only, not training noise: another seed can "
            "move a score too.",
        ]
    else:
        lines = [
            "Every row is a variant over its seeds (the seeds column): each score is the mean ± sample standard "
            "deviation (ddof=1) over the seeds' test scores; a score without ± comes from one seed. **Bold**: the "
            "best mean of the column.",
            f"Δ columns: the variant's mean test score over its seeds minus that of the best variant by mean test "
            f"BLEU-4 (**{best.label}**), on the same {n_images} test images, with a 95% confidence interval from a "
            f"hierarchical bootstrap ({n_boot} resamples, seed {seed}; 2.5th–97.5th percentiles). Each resample "
            "draws the test images with replacement, the same images for every variant (paired), and, "
            "independently per variant, its seeds with replacement; the variant's score is the mean over the "
            "drawn seeds of each drawn run's score on the drawn images.",
            "How to read it: an interval that does not contain 0 is a difference larger than what both the choice "
            "of test images and the training seed explain; an interval containing 0 means neither this test set "
            "nor these seeds can tell the two variants apart. With few seeds (e.g. 3) the seed resampling is "
            "coarse: read the intervals as approximate.",
        ]
        single = [v.label for v in variants if len(v.runs) == 1]
        if single:
            lines.append(f"One seed only: {', '.join(single)}. Their intervals hold no seed-to-seed variance, so "
                         "they are narrower than they would be with several seeds.")
    lines.append("BLEU-4 is recomputed as exact corpus BLEU (pycocoevalcap's) on every resample. CIDEr is the mean of "
                 "pycocoevalcap's per-image CIDEr-D, with document frequencies computed once from the full test set "
                 "and kept fixed across resamples.")
    if deltas:
        names = {name: header.split(" vs ")[0] for header, name in DELTA_COLUMNS}
        held = [f"{label}: {', '.join(names[name] for name, ok in by_name.items() if ok)}"
                for label, by_name in holding_up(variants, deltas, best).items() if any(by_name.values())]
        lines.append("Differences to the best variant that hold up (95% interval excludes 0): "
                     + ("; ".join(held) if held else "none") + ".")
    shown = [key for _, key, _ in columns if key in SHAPES_LEGEND]
    if shown:
        lines += [SHAPES_LEGEND[key] for key in shown]
        if any(key.endswith(("_rate", "relation_correct")) for key in shown):
            lines.append("An accuracy without its rate can be gamed by stating less: a captioner that states a "
                         "relation or a size only when it is sure scores a high accuracy at a low rate. Read each "
                         "accuracy beside its rate; relation correct counts an unstated relation as wrong. Rates "
                         "are never bold: stating more is not better by itself.")
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
