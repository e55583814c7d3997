"""Datasets: readers for the real formats, the embedded shapes world, the vocabulary and the DataModule."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

from .records import SPLITS, CaptionDataset, CaptionRecord, DatasetError, SkipReport

__all__ = ["SPLITS", "CaptionDataset", "CaptionRecord", "DatasetError", "SkipReport", "load_dataset", "dataset_id",
           "is_shapes"]

SHAPES_READER = "captioner.data.shapes.build_shapes"


def load_dataset(cfg: Mapping[str, Any], progress: bool = True) -> CaptionDataset:
    """Read the dataset a Hydra `data` node describes: `data.reader` is the reader (`_target_`, a function
    `reader(root, **options) -> CaptionDataset`, as a `_partial_` node with its options), `data.root` its folder.
    A reader that takes `progress` is told whether to show it."""
    import inspect

    from hydra.utils import instantiate

    reader = dict(cfg.get("reader") or {})
    if "_target_" not in reader:
        raise DatasetError(f"data.reader has no _target_: name the function that reads {cfg.get('name', 'the data')}"
                           " (e.g. captioner.data.formats.read_csv)")
    read = instantiate(reader, _convert_="all")
    root = Path(str(cfg["root"])).expanduser()
    takes_progress = "progress" in inspect.signature(read).parameters
    return read(root, progress=progress) if takes_progress else read(root)


def is_shapes(cfg: Mapping[str, Any]) -> bool:
    """Whether a `data` node is the embedded shapes world (its generator as the reader)."""
    return dict(cfg.get("reader") or {}).get("_target_") == SHAPES_READER


def dataset_id(dataset: CaptionDataset) -> str:
    """Identity of a dataset for cache keys: its format name and resolved root."""
    return f"{dataset.name}:{hashlib.sha256(str(Path(dataset.root).resolve()).encode()).hexdigest()[:12]}"
