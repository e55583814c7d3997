"""The report's figures: loss and validation BLEU-4 curves of every run, one colour per run in both."""

from __future__ import annotations

import io
from pathlib import Path

from ..files import atomic_write_bytes
from .runs import Run


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
