"""Comparison report over a Hydra multirun (`make sweep`): one table row per variant with paired-bootstrap
confidence intervals against the best variant, loss and BLEU-4 curves, and an HTML page with test images and every
variant's caption side by side (plus attention maps for the attention variant when `captioner.caption` exists).

usage: python experiments/compare.py SWEEP_DIR [--out DIR] [--bootstrap 1000] [--seed 0] [--html-images 12]

Writes report.md, report.html (self-contained), report.json, loss_curves.png and bleu_curves.png into
SWEEP_DIR/report/ (or --out).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python experiments/compare.py` puts experiments/, not the repo root, on the path
    sys.path.insert(0, str(REPO))

from captioner.data.vocabulary import normalize  # noqa: E402
from captioner.errors import UserError  # noqa: E402
from captioner.files import atomic_write_bytes, atomic_write_text  # noqa: E402
from captioner.metrics import bleu_from_stats, bleu_stats, caption_metrics, evaluation_texts  # noqa: E402

log = logging.getLogger("compare")

CURVES = ("train/loss_epoch", "val/loss", "val/bleu_4")
CI_LEVEL = 0.95


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


# -- reading the sweep ------------------------------------------------------------------------------------------------

VARIANT_ORDER = ["resnet_rnn", "dino_rnn", "dino_lstm", "dino_lstm_init", "dino_attention"]


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
    # The five variants in their numbered order (1-5), whatever order the sweep ran them in (`make demo` starts the
    # longest first); other runs after them, in job order (a stable sort).
    runs.sort(key=lambda r: VARIANT_ORDER.index(r.metrics.get("model")) if r.metrics.get("model") in VARIANT_ORDER
              else len(VARIANT_ORDER))
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


# -- paired bootstrap -------------------------------------------------------------------------------------------------

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


# -- the table --------------------------------------------------------------------------------------------------------

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


# -- figures ----------------------------------------------------------------------------------------------------------

def plot_curves(runs: list[Run], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    colors = {r.label: plt.cm.tab10(i % 10) for i, r in enumerate(runs)}  # one colour per variant in both figures

    def panel(ax, key, title, ylabel):
        drawn = False
        for run in runs:
            points = run.curves.get(key) or []
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker="o", markersize=3, color=colors[run.label], label=run.label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("epoch (0-based, as in checkpoint names)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)

    paths = {"loss": out_dir / "loss_curves.png", "bleu": out_dir / "bleu_curves.png"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    panel(a, "train/loss_epoch", "train loss (epoch mean)", "cross-entropy")
    panel(b, "val/loss", "validation loss", "cross-entropy")
    fig.tight_layout()
    save_figure(fig, paths["loss"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    panel(ax, "val/bleu_4", "validation BLEU-4 (greedy decoding; ★ = the tested checkpoint)", "BLEU-4")
    for run in runs:  # the checkpoint each test score comes from
        best_epoch = run.metrics.get("best_epoch")
        points = dict(run.curves.get("val/bleu_4") or [])
        if best_epoch in points:
            ax.plot([best_epoch], [points[best_epoch]], marker="*", markersize=12, color=colors[run.label])
    fig.tight_layout()
    save_figure(fig, paths["bleu"])
    plt.close(fig)
    return paths


def save_figure(fig, path: Path) -> None:
    """A PNG written whole or not at all, never through a link planted at its name (savefig opens the name)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getbuffer())


# -- HTML -------------------------------------------------------------------------------------------------------------

def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _pil_uri(image, fmt: str = "PNG", max_width: int | None = None) -> str:
    if max_width and image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return _data_uri(buf.getvalue(), f"image/{fmt.lower()}")


def _load_image(path: str | None):
    from PIL import Image

    if not path or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        log.warning("cannot read %s: %s", path, e)
        return None


def attention_maps(run: Run, images: dict) -> tuple[dict[str, dict], str | None]:
    """Attention maps of one attention-family run for the given {key: PIL image}: ({key: {"caption", "uri"}},
    note). `captioner.caption` is optional (another module); without it, or on any failure there, the report is
    still written and the note says why the maps are missing."""
    try:
        from captioner.caption import ImageCaptioner, attention_figure
    except (ImportError, AttributeError) as e:
        return {}, f"attention maps skipped: captioner.caption.ImageCaptioner is not available ({e})"
    except Exception as e:  # e.g. a half-written module that does not even import
        return {}, f"attention maps skipped: importing captioner.caption failed: {type(e).__name__}: {e}"
    ckpt = run.metrics.get("best_checkpoint")
    if not ckpt or not Path(ckpt).is_file():
        return {}, f"attention maps skipped: best checkpoint {ckpt!r} not found"
    keys = [k for k, im in images.items() if im is not None]
    if not keys:
        return {}, "attention maps skipped: none of the sample images could be read"
    try:
        captioner = ImageCaptioner(ckpt, device="cpu")
        results = captioner.caption([images[k] for k in keys], attention=True)
        maps = {}
        for key, result in zip(keys, results):
            if result.get("attention") is not None:
                figure = attention_figure(images[key], result["words"], result["attention"])
                # JPEG: heat maps over photos are ~10x smaller than PNG, and the page embeds them all
                maps[key] = {"caption": result["caption"],
                             "uri": _pil_uri(figure.convert("RGB"), "JPEG", max_width=1600)}
        return maps, None if maps else "attention maps skipped: the captioner returned no attention"
    except Exception as e:  # an optional extra must not cost the user the rest of the report
        log.warning("attention maps of %s failed: %s: %s", run.label, type(e).__name__, e)
        return {}, f"attention maps skipped: {type(e).__name__}: {e}"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
td.text, th { text-align: left; }
.sample { display: flex; gap: 1.5em; margin: 1.5em 0; border-top: 1px solid #ddd; padding-top: 1em; }
.sample img.photo { width: 224px; height: auto; }
.sample td { text-align: left; }
.note { color: #777; font-size: 0.85em; }
img.figure { max-width: 100%; }
img.attention { max-width: 100%; display: block; margin-top: 4px; }
"""


def render_html(title: str, header: list[str], rows: list, legend: list[str], missing: list[dict],
                figures: dict[str, Path], samples: list[dict], runs: list[Run], maps: dict[str, dict],
                map_notes: dict[str, str]) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{HTML_STYLE}</style></head><body><h1>{e(title)}</h1>"]
    out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for cells in rows:
        tds = []
        for i, (text, bold) in enumerate(cells):
            cls = " class='text'" if i < 3 else ""
            tds.append(f"<td{cls}>{'<b>' + e(text) + '</b>' if bold else e(text)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</table>")
    out += [f"<p class='note'>{e(line.replace('**', ''))}</p>" for line in legend]
    if missing:
        out.append("<h3>Missing runs</h3><ul>" + "".join(
            f"<li><code>{e(m['run'])}</code>: {e(m['reason'])}</li>" for m in missing) + "</ul>")
    for name, path in figures.items():
        out.append(f"<h2>{e(path.stem.replace('_', ' '))}</h2>"
                   f"<img class='figure' alt='{e(name)}' src='{_data_uri(path.read_bytes(), 'image/png')}'>")
    if samples:
        out.append(f"<h2>Test images (first {len(samples)} by key)</h2>")
    for note_label, note in map_notes.items():
        out.append(f"<p class='note'>{e(note_label)}: {e(note)}</p>")
    for s in samples:
        if s["uri"]:
            photo = f"<img class='photo' alt='{e(s['key'])}' src='{s['uri']}'>"
        elif s["path"]:
            photo = f"<p class='note'>image not found: {e(str(s['path']))}</p>"
        else:  # predictions.jsonl written before train.py recorded the path
            photo = "<p class='note'>no image_path in predictions.jsonl</p>"
        refs = "".join(f"<li>{e(r)}</li>" for r in s["references"])
        caps = []
        for run in runs:
            if run.predictions is None:
                continue
            cell = e(run.predictions[s["key"]]["hypothesis"])
            m = maps.get(run.label, {}).get(s["key"])
            if m:
                same = normalize(m["caption"]) == normalize(run.predictions[s["key"]]["hypothesis"])
                differs = "" if same else \
                    f"<div class='note'>maps of the caption decoded now: {e(m['caption'])}</div>"
                cell += f"{differs}<img class='attention' alt='attention of {e(run.label)}' src='{m['uri']}'>"
            caps.append(f"<tr><th>{e(run.label)}</th><td>{cell}</td></tr>")
        out.append(f"<div class='sample'><div>{photo}<div class='note'>{e(s['key'])}</div></div>"
                   f"<div><b>references</b><ul>{refs}</ul><table>{''.join(caps)}</table></div></div>")
    out.append("</body></html>")
    return "\n".join(out)


# -- the report -------------------------------------------------------------------------------------------------------

def _md_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if bold else text


def build_report(sweep_dir, out_dir=None, n_boot: int = 1000, seed: int = 0, html_images: int = 12) -> dict:
    """Write report.md / report.html / report.json / loss_curves.png / bleu_curves.png; return report.json's
    content."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    if n_boot < 1:
        raise ReportError(f"--bootstrap must be at least 1 (got {n_boot})")
    runs, missing = find_runs(sweep_dir, out_dir)
    for run in runs:
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
    keys = align_predictions(runs)
    score_runs(runs, keys)

    # best by test BLEU-4 as recorded; the first run wins a tie
    best = max(runs, key=lambda r: (r.test.get("bleu_4") if r.test.get("bleu_4") is not None else -1.0))
    deltas: dict[str, dict] = {}
    if best.stats is not None and keys:
        counts = bootstrap_counts(len(keys), n_boot, seed)
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

    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = build_table(runs, deltas, best)
    prior = sorted({round(float(r.metrics["caption_prior_bleu_4"]), 6) for r in runs
                    if r.metrics.get("caption_prior_bleu_4") is not None})
    legend = legend_lines(len(keys), n_boot, seed, best, prior)
    figures = plot_curves(runs, out_dir)
    title = f"Comparison of {len(runs)} variants: {sweep_dir.resolve().name}"
    notes = [f"{r.label}: {n}" for r in runs for n in r.notes]

    # report.md
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
    atomic_write_text(out_dir / "report.md", "\n".join(md))

    # report.html: sample images, references, captions, attention maps
    sample_keys = keys[:max(html_images, 0)]
    # references and image paths are the same in every run (checked by key); take them from one that has them
    ref_run = next((r for r in [best, *runs] if r.predictions is not None), None)
    images, samples = {}, []
    for key in sample_keys:
        row = ref_run.predictions[key]
        images[key] = _load_image(row.get("image_path"))
        samples.append({"key": key, "path": row.get("image_path"), "references": row["references"],
                        "uri": _pil_uri(images[key], "JPEG", max_width=448) if images[key] is not None else None})
    maps, map_notes = {}, {}
    for run in runs:
        if run.metrics.get("family") == "attention" and samples:
            maps[run.label], note = attention_maps(run, images)
            if note:
                map_notes[run.label] = note
    page = render_html(title, header, rows, legend + notes, missing, figures,
                       samples, runs, maps, map_notes)
    atomic_write_text(out_dir / "report.html", page)

    # report.json: the same numbers as data
    report = {
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    sys.exit(main())
