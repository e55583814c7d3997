"""Build a dataset and its feature cache ahead of training (training does the same on demand).

usage: python -m captioner.prepare [hydra overrides]
  e.g. python -m captioner.prepare data=shapes encoder=efficientnet_lite0
       python -m captioner.prepare data=flickr8k data.root=~/data/flickr8k encoder=dinov2_vits14 attention=mha
       torchrun --nproc-per-node 4 -m captioner.prepare data=coco ...   # 4 processes (GPUs) share the extraction
"""

from __future__ import annotations

import os
import sys
import time

from hydra.utils import get_class
from omegaconf import DictConfig

from .config import command_main, resolve_device, resolve_extraction_workers
from .data import SPLITS, dataset_id, load_dataset
from .encoders import EncoderSpec
from .features import SOLO, ExtractionGroup, prepare_features


def _extraction_group(device: str) -> tuple[ExtractionGroup, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, else gloo), one GPU per local rank;
    every rank then extracts its share of each cache. Otherwise one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return SOLO, device
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return ExtractionGroup.from_torch_distributed(), device


def prepare(cfg: DictConfig) -> int:
    t0 = time.perf_counter()
    group, device = _extraction_group(resolve_device(cfg.features.device))
    if group.rank != 0:
        group.barrier()  # rank 0 generates / reads the dataset first (generation is not shared)
    dataset = load_dataset(cfg.data)
    if group.rank == 0:
        group.barrier()
    print(f"dataset {dataset.name} at {dataset.root}: " + ", ".join(
        f"{s} {n} images / {c} captions" for s, (n, c) in dataset.counts().items()) + f" ({time.perf_counter() - t0:.1f} s)")
    if dataset.skipped.total:
        print(dataset.skipped.summary())
    spec = EncoderSpec.from_config(cfg.encoder)
    caches = prepare_features(
        {s: dataset.split(s) for s in SPLITS}, spec, cfg.paths.cache_dir, dataset_id(dataset),
        spatial=get_class(cfg.model._target_).feature == "spatial", batch_size=cfg.features.batch_size,
        num_workers=resolve_extraction_workers(cfg.features.num_workers, device), device=device, group=group,
        decode=cfg.features.decode)  # auto is resolved by prepare_features, for the device above
    if group.rank != 0:
        return 0
    total = 0
    for split, cache in caches.items():
        size = sum(f.stat().st_size for f in cache.path.iterdir())
        total += size
        extra = f", {len(cache.failed)} unreadable image(s) left out" if cache.failed else ""
        print(f"  {split}: {len(cache.keys)} images, features {tuple(cache.pooled.shape)}"
              f"{'' if cache.spatial is None else f' + spatial {tuple(cache.spatial.shape)}'} in {cache.path} "
              f"({size / 2**20:.1f} MiB){extra}")
    print(f"ready: {spec.name} ({spec.weights}) features for {dataset.name}, {total / 2**20:.1f} MiB on disk, "
          f"{time.perf_counter() - t0:.1f} s" + (f" ({group.world} processes)" if group.world > 1 else ""))
    return 0


prepare.__doc__ = __doc__


def main() -> None:
    sys.exit(command_main(prepare))


if __name__ == "__main__":
    main()
