"""The feature cache: run the frozen encoder once per (dataset, split, encoder, weights, transform, input size).

Layout of one cache entry, `<cache_dir>/<key>/`:
  manifest.json   keys (image order), shapes, encoder spec, failed images, sha256 of each array file
  global.npy      (N, D)    float16
  spatial.npy     (N, T, D) float16   (only when a config needs spatial tokens)
Training opens the arrays with `np.load(mmap_mode="r")`: nothing is loaded whole into RAM.

Extraction writes into `<key>.partial/` (preallocated .npy files via open_memmap) and records its progress after
each flushed chunk, so a killed extraction resumes where it stopped; only a finished extraction is renamed to
`<key>/`, so a half-written cache can never look valid. Batches are the same on resume as in one go, so the result
is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data.records import CaptionRecord
from .encoders import EncoderSpec, FrozenEncoder, spec_transform, transform_signature
from .images import ImageReadError, load_image

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def cache_key(dataset_id: str, split: str, keys: Sequence[str], spec: EncoderSpec, transform_sig: str,
              spatial: bool) -> str:
    """Hash of everything that determines the features; changing any of them never reuses stale features."""
    payload = json.dumps({
        "version": FORMAT_VERSION, "dataset": dataset_id, "split": split,
        "images": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
        "encoder": spec.timm_name, "weights": spec.weights_id(), "input_size": spec.input_size,
        "transform": transform_sig, "spatial": spatial,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
class FeatureCache:
    """An opened (memory-mapped) cache entry."""

    path: Path
    keys: list[str]
    pooled: np.ndarray                 # (N, D) float16 memmap
    spatial: np.ndarray | None         # (N, T, D) float16 memmap
    grid: tuple[int, int]
    failed: dict[str, str] = field(default_factory=dict)  # key -> why the image could not be read

    @property
    def dim(self) -> int:
        return int(self.pooled.shape[1])

    def row(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def valid_rows(self) -> np.ndarray:
        failed = set(self.failed)
        return np.array([k not in failed for k in self.keys], dtype=bool)

    @classmethod
    def open(cls, path: Path) -> "FeatureCache":
        manifest = json.loads((path / "manifest.json").read_text())
        pooled = np.load(path / "global.npy", mmap_mode="r")
        spatial = np.load(path / "spatial.npy", mmap_mode="r") if manifest["spatial"] else None
        return cls(path, manifest["keys"], pooled, spatial, tuple(manifest["grid"]), manifest.get("failed", {}))


class _ImageFiles(Dataset):
    """Decodes + transforms images in DataLoader workers, in parallel with the encoder forward."""

    def __init__(self, paths: Sequence[Path], transform, input_size: int) -> None:
        self.paths, self.transform, self.input_size = list(paths), transform, input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(self.paths[i])), ""
        except ImageReadError as e:
            return torch.zeros(3, self.input_size, self.input_size), str(e)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_features(
    records_by_split: dict[str, Sequence[CaptionRecord]],
    spec: EncoderSpec,
    cache_dir: str | Path,
    dataset_id: str,
    spatial: bool = False,
    **extract_kwargs,
) -> dict[str, FeatureCache]:
    """Open (or build) the cache of every split; the encoder is only built when some split is missing."""
    sig = transform_signature(spec_transform(spec))
    out: dict[str, FeatureCache] = {}
    encoder = None
    for split, records in records_by_split.items():
        key = cache_key(dataset_id, split, [r.key for r in records], spec, sig, spatial)
        if (Path(cache_dir) / key / "manifest.json").exists():
            out[split] = FeatureCache.open(Path(cache_dir) / key)
            continue
        encoder = encoder or FrozenEncoder(spec)
        out[split] = extract_features(encoder, records, cache_dir, dataset_id, split, spatial, **extract_kwargs)
    return out


def extract_features(
    encoder: FrozenEncoder,
    records: Sequence[CaptionRecord],
    cache_dir: str | Path,
    dataset_id: str,
    split: str,
    spatial: bool = False,
    batch_size: int = 8,
    num_workers: int = 2,
    flush_every: int = 32,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> FeatureCache:
    """Return the cache for these records, extracting (or resuming) it if needed."""
    from tqdm.auto import tqdm

    keys = [r.key for r in records]
    transform = encoder.transform()
    key = cache_key(dataset_id, split, keys, encoder.spec, transform_signature(transform), spatial)
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if (final / "manifest.json").exists():
        return FeatureCache.open(final)

    partial = cache_dir / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    n, dim, tokens = len(records), encoder.dim, encoder.num_tokens
    progress_file = partial / "progress.json"
    state = json.loads(progress_file.read_text()) if progress_file.exists() else None
    if state is None or state.get("n") != n:
        state = {"n": n, "done": 0, "failed": {}}
        mode = "w+"
    else:
        mode = "r+"
        log.info("resuming feature extraction of %s/%s at image %d of %d", dataset_id, split, state["done"], n)
    pooled = np.lib.format.open_memmap(partial / "global.npy", mode=mode, dtype=np.float16, shape=(n, dim))
    grid_arr = (np.lib.format.open_memmap(partial / "spatial.npy", mode=mode, dtype=np.float16,
                                          shape=(n, tokens, dim)) if spatial else None)

    start = state["done"]
    loader = DataLoader(
        _ImageFiles([r.image for r in records[start:]], transform, encoder.spec.input_size),
        batch_size=batch_size, num_workers=num_workers, shuffle=False,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    encoder = encoder.to(device)
    bar = tqdm(total=n, initial=start, desc=f"features {split}", unit="img", disable=not progress, smoothing=0.1)
    done, since_flush = start, 0
    failed: dict[str, str] = dict(state["failed"])

    def checkpoint() -> None:
        pooled.flush()
        if grid_arr is not None:
            grid_arr.flush()
        _atomic_write_text(progress_file, json.dumps({"n": n, "done": done, "failed": failed}))

    with torch.inference_mode():
        for images, errors in loader:
            g, s = encoder(images.to(device, non_blocking=True))
            b = images.shape[0]
            pooled[done:done + b] = g.to("cpu", torch.float16).numpy()
            if grid_arr is not None:
                grid_arr[done:done + b] = s.to("cpu", torch.float16).numpy()
            for j, err in enumerate(errors):
                if err:
                    failed[keys[done + j]] = err
                    pooled[done + j] = 0
                    if grid_arr is not None:
                        grid_arr[done + j] = 0
            done += b
            bar.update(b)
            since_flush += 1
            if since_flush >= flush_every:
                checkpoint()
                since_flush = 0
    bar.close()
    checkpoint()
    del pooled, grid_arr

    manifest = {
        "version": FORMAT_VERSION, "dataset": dataset_id, "split": split, "keys": keys, "spatial": spatial,
        "grid": list(encoder.grid), "dim": dim, "encoder": encoder.spec.to_dict(), "failed": failed,
        "sha256": {name: _sha256(partial / name) for name in ("global.npy", "spatial.npy") if (partial / name).exists()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    progress_file.unlink()
    _atomic_write_text(partial / "manifest.json", json.dumps(manifest))
    if failed:
        log.warning("%d image(s) of %s/%s could not be read and are left out: %s", len(failed), dataset_id, split,
                    "; ".join(list(failed.values())[:5]))
    try:
        os.replace(partial, final)
    except OSError:  # another process finished the same cache first: theirs is identical, keep it
        shutil.rmtree(partial, ignore_errors=True)
    return FeatureCache.open(final)
