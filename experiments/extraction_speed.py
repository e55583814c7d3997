"""Feature extraction images/s (decode + resize + forward + fp16 write) beside the bare encoder forward images/s
at the same batch size, on the same machine in one run; plus the cache size on disk.

usage: python experiments/extraction_speed.py [--images 400] [--batch-size 8] [--num-workers 1]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from captioner.data.shapes import build_shapes
from captioner.encoders import EncoderSpec, FrozenEncoder
from captioner.features import extract_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--spatial", action="store_true", help="also store the 7x7 token grid")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="captioner-bench-"))
    try:
        t0 = time.perf_counter()
        data = build_shapes(work / "shapes", num_train=args.images, num_val=1, num_test=1, progress=False)
        gen = time.perf_counter() - t0
        records = data.split("train")
        encoder = FrozenEncoder(EncoderSpec(name="efficientnet_lite0", weights="package"))

        # bare forward: the same number of images, already as tensors, same batch size
        x = torch.randn(args.batch_size, 3, 224, 224)
        with torch.inference_mode():
            encoder(x)  # warm-up
            t0 = time.perf_counter()
            n = 0
            while n < args.images:
                encoder(x)
                n += args.batch_size
            forward_ips = n / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        cache = extract_features(encoder, records, work / "cache", "bench", "train", spatial=args.spatial,
                                 batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
        extract_ips = len(records) / (time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in cache.path.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"shapes generation: {args.images + 2} images in {gen:.1f} s ({(args.images + 2) / gen:.0f} img/s)")
    print(f"bare encoder forward (batch {args.batch_size}): {forward_ips:.1f} img/s")
    print(f"feature extraction (decode+resize+forward+write, {args.num_workers} workers): {extract_ips:.1f} img/s")
    print(f"ratio extraction / forward: {extract_ips / forward_ips:.2f}  (goal >= 0.90)")
    print(f"cache on disk: {size / 2**20:.1f} MiB for {len(records)} images "
          f"({size / len(records) / 1024:.1f} KiB/image, {'pooled + 7x7 grid' if args.spatial else 'pooled'}, fp16)")


if __name__ == "__main__":
    main()
