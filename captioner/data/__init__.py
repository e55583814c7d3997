"""Datasets: readers for the real formats, the embedded shapes world, the vocabulary and the DataModule."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

from .records import SPLITS, CaptionDataset, CaptionRecord, DatasetError, SkipReport

__all__ = ["SPLITS", "CaptionDataset", "CaptionRecord", "DatasetError", "SkipReport", "load_dataset", "dataset_id"]

SHAPES_KEYS = ("num_train", "num_val", "num_test", "seed", "image_size", "captions_per_image")


def load_dataset(cfg: Mapping[str, Any], progress: bool = True) -> CaptionDataset:
    """Read the dataset a Hydra `data` node describes (`data.format` picks the reader; `data.reader` holds its
    file-name options, whose defaults are each format's real layout)."""
    fmt = cfg["format"]
    root = Path(str(cfg["root"])).expanduser()
    if fmt == "shapes":
        from .shapes import build_shapes

        return build_shapes(root, progress=progress, **{k: cfg[k] for k in SHAPES_KEYS if k in cfg})
    from .formats import READERS

    if fmt not in READERS:
        raise DatasetError(f"unknown data.format '{fmt}'; known: shapes, {', '.join(READERS)}")
    options = dict(cfg.get("reader") or {})
    return READERS[fmt](root, **options)


def dataset_id(dataset: CaptionDataset) -> str:
    """Identity of a dataset for cache keys: its format name and resolved root."""
    return f"{dataset.name}:{hashlib.sha256(str(Path(dataset.root).resolve()).encode()).hexdigest()[:12]}"
