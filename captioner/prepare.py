"""Build a dataset and its feature cache ahead of training (training does the same on demand).

usage: python -m captioner.prepare [hydra overrides]
  e.g. python -m captioner.prepare data=shapes encoder=efficientnet_lite0
       python -m captioner.prepare data=flickr8k data.root=~/data/flickr8k encoder=dinov2_vits14 features.kind=spatial
"""

from __future__ import annotations

import sys
import time

from omegaconf import DictConfig

from .config import command_main, resolve_device
from .data import SPLITS, dataset_id, load_dataset
from .encoders import EncoderSpec
from .features import prepare_features


def prepare(cfg: DictConfig) -> int:
    t0 = time.perf_counter()
    dataset = load_dataset(cfg.data)
    print(f"dataset {dataset.name} at {dataset.root}: " + ", ".join(
        f"{s} {n} images / {c} captions" for s, (n, c) in dataset.counts().items()) + f" ({time.perf_counter() - t0:.1f} s)")
    if dataset.skipped.total:
        print(dataset.skipped.summary())
    spec = EncoderSpec.from_config(cfg.encoder)
    caches = prepare_features(
        {s: dataset.split(s) for s in SPLITS}, spec, cfg.paths.cache_dir, dataset_id(dataset),
        spatial=cfg.features.kind == "spatial", batch_size=cfg.features.batch_size,
        num_workers=cfg.features.num_workers, device=resolve_device(cfg.features.device))
    total = 0
    for split, cache in caches.items():
        size = sum(f.stat().st_size for f in cache.path.iterdir())
        total += size
        extra = f", {len(cache.failed)} unreadable image(s) left out" if cache.failed else ""
        print(f"  {split}: {len(cache.keys)} images, features {tuple(cache.pooled.shape)}"
              f"{'' if cache.spatial is None else f' + spatial {tuple(cache.spatial.shape)}'} in {cache.path} "
              f"({size / 2**20:.1f} MiB){extra}")
    print(f"ready: {spec.name} ({spec.weights}) features for {dataset.name}, {total / 2**20:.1f} MiB on disk, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


prepare.__doc__ = __doc__


def main() -> None:
    sys.exit(command_main(prepare))


if __name__ == "__main__":
    main()
