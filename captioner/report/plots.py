"""The report's figures: loss and validation BLEU-4 curves of every variant, one colour per variant in both; a
variant with several seeds is drawn as the mean over its seeds with a min–max band across them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from .runs import Variant

BAND = "min–max over seeds"  # what the shaded band spans; the legend and report.json say it


def seed_curve(variant: Variant, key: str) -> list[dict]:
    """The variant's curve of `key` over its seeds: per epoch, the mean, min and max over the seeds that logged
    that epoch (a run stopped early or resumed may lack some), and how many did."""
    per_epoch: dict[int, list[float]] = {}
    for run in variant.runs:
        for epoch, value in run.curves.get(key) or []:
            per_epoch.setdefault(epoch, []).append(value)
    return [{"epoch": e, "mean": vs[0] if len(vs) == 1 else float(np.mean(vs)), "min": min(vs), "max": max(vs),
             "n": len(vs)} for e, vs in sorted(per_epoch.items())]


def plot_curves(variants: list[Variant], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    colors = {v.label: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}  # one colour per variant in both figures
    several = any(len(v.runs) > 1 for v in variants)

    def panel(ax, key, title, ylabel):
        drawn = False
        for variant in variants:
            points = seed_curve(variant, key)
            if not points:
                continue
            epochs = [p["epoch"] for p in points]
            label = variant.label if len(variant.runs) == 1 else f"{variant.label} ({len(variant.runs)} seeds)"
            ax.plot(epochs, [p["mean"] for p in points], marker="o", markersize=3, color=colors[variant.label],
                    label=label)
            if len(variant.runs) > 1:
                ax.fill_between(epochs, [p["min"] for p in points], [p["max"] for p in points],
                                color=colors[variant.label], alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title + (f"\nline: mean over seeds, band: {BAND}" if several else ""))
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
    for variant in variants:  # the checkpoint each test score comes from: one star per seed, at its own value
        for run in variant.runs:
            best_epoch = run.metrics.get("best_epoch")
            points = dict(run.curves.get("val/bleu_4") or [])
            if best_epoch in points:
                ax.plot([best_epoch], [points[best_epoch]], marker="*", markersize=12, color=colors[variant.label])
    fig.tight_layout()
    save_figure(fig, paths["bleu"])
    plt.close(fig)
    return paths


def save_figure(fig, path: Path) -> None:
    """A PNG written whole or not at all, never through a link planted at its name (savefig opens the name)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getbuffer())
