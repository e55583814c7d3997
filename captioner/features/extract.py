"""The encode loop: images of some rows -> the frozen encoder -> those rows of the cache's arrays.

Images are decoded and resized in DataLoader workers (the per-image stage of `split_transform`), normalised as a
batch beside the encoder, and written as float16. An unreadable image never stops the loop: its row is zeros and it
is reported with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.records import CaptionRecord
from ..encoders import FrozenEncoder, split_transform
from ..images import ImageReadError, load_image
from .cache import source_fingerprint

log = logging.getLogger(__name__)


def worker_context(num_workers: int):
    """The platform's default multiprocessing start method for DataLoader workers, named explicitly: inside a
    worker of a parallel sweep (hydra/launcher=parallel, joblib's loky) the inherited default is loky's own
    context, whose processes DataLoader cannot start ("'Process' object has no attribute 'env'")."""
    import multiprocessing

    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0]) if num_workers > 0 else None


class _ImageFiles(Dataset):
    """Decodes + resizes images (in DataLoader workers when there are any, in parallel with the encoder forward);
    `image_stage` ends in a uint8 tensor when the batch stage of `split_transform` normalises whole batches. Each
    item is (image, why it could not be read or "", the file's fingerprint taken before it was decoded)."""

    def __init__(self, paths: Sequence[Path], image_stage, input_size: int, dtype: torch.dtype) -> None:
        self.paths, self.image_stage, self.input_size, self.dtype = list(paths), image_stage, input_size, dtype

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        fingerprint = source_fingerprint(self.paths[i])
        try:
            return self.image_stage(load_image(self.paths[i])), "", fingerprint
        except ImageReadError as e:  # a zero image keeps the batch shape; its row is zeroed and listed as failed
            return torch.zeros(3, self.input_size, self.input_size, dtype=self.dtype), str(e), fingerprint


def _collate_images(items: list[tuple]) -> tuple[torch.Tensor, list[str], list]:
    images, errors, fingerprints = zip(*items)
    return torch.stack(images), list(errors), list(fingerprints)


def encode_batches(encoder: FrozenEncoder, records: Sequence[CaptionRecord], rows: Sequence[int],
                   arrays: dict[str, np.memmap], batch_size: int, num_workers: int, device,
                   bar) -> Iterator[tuple[list[int], dict[str, str], list]]:
    """Encode `records[rows]` in batches of `batch_size` into those rows of `arrays`; after each batch yield
    (its rows, {key: why} of its unreadable images, whose rows are zeroed, and its images' fingerprints)."""
    if not len(rows):
        return
    image_stage, batch_stage = split_transform(encoder.transform())
    dtype = torch.uint8 if batch_stage is not None else torch.float32
    loader = DataLoader(
        _ImageFiles([records[i].image for i in rows], image_stage, encoder.spec.input_size, dtype),
        batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=_collate_images,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None, multiprocessing_context=worker_context(num_workers),
    )
    pos = 0
    with torch.inference_mode():
        for images, errors, fingerprints in loader:
            images = images.to(device, non_blocking=True)
            g, s = encoder(batch_stage(images) if batch_stage is not None else images)
            out = {"global.npy": g, "spatial.npy": s}
            batch = list(rows[pos:pos + images.shape[0]])
            # consecutive rows (every build and repair) as one slice; scattered ones (refreshed images) one by one
            where = slice(batch[0], batch[-1] + 1) if batch[-1] - batch[0] == len(batch) - 1 else batch
            for name, array in arrays.items():
                array[where] = out[name].to("cpu", torch.float16).numpy()
            failed = {}
            for row, err in zip(batch, errors):
                if err:
                    failed[records[row].key] = err
                    for array in arrays.values():
                        array[row] = 0
            pos += len(batch)
            bar.update(len(batch))
            yield batch, failed, fingerprints


def encode_ranges(encoder: FrozenEncoder, records: Sequence[CaptionRecord], ranges: list[tuple[int, int]],
                  arrays: dict[str, np.memmap], batch_size: int, num_workers: int, device,
                  on_range: Callable[[int, int, dict[str, str], list], None], bar) -> None:
    """Encode the rows of each [a, b) range into `arrays`; after each range, `on_range(a, b, failed,
    fingerprints)`.

    Every range starts at a multiple of `batch_size` and all but the array's last chunk are whole multiples of it,
    so the batches are exactly those of an extraction in one go, and so are the resulting bytes.
    """
    rows = [i for a, b in ranges for i in range(a, b)]
    pending = iter(ranges)
    a, b = next(pending, (None, None))
    failed, fingerprints = {}, []
    for batch, batch_failed, batch_fingerprints in encode_batches(encoder, records, rows, arrays, batch_size,
                                                                  num_workers, device, bar):
        assert batch[-1] < b, "a batch straddles two chunks"
        failed.update(batch_failed)
        fingerprints.extend(batch_fingerprints)
        if batch[-1] == b - 1:
            on_range(a, b, failed, fingerprints)
            failed, fingerprints = {}, []
            a, b = next(pending, (None, None))


def flush(arrays: dict[str, np.memmap]) -> None:
    for array in arrays.values():
        array.flush()  # msync: the rows are on disk before any JSON file says they are done
