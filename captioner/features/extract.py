"""The encode loop: images of some rows -> the frozen encoder -> those rows of the cache's arrays.

Two decode paths (`decode`, from `features.decode`):
  - `pil`: images are decoded and resized in DataLoader workers (the per-image stage of `split_transform`);
  - `device`: workers only read a plain JPEG's bytes (checking its header with PIL, without decoding it); the main
    process decodes a batch of them at once on the extraction device (`torchvision.io.decode_jpeg`: nvjpeg on a GPU)
    and resizes them there (`tensor_geometry`). Any other file (PNG, CMYK JPEG, huge, damaged ...) and any JPEG the
    device fails to decode takes the PIL path, so it gives the same pixels and the same error as with `pil`.
Either way the batch is normalised beside the encoder and written as float16. An unreadable image never stops the
loop: its row is zeros and it is reported with the reason.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DECODES
from ..data.records import CaptionRecord
from ..encoders import FrozenEncoder, split_transform
from ..encoders.tensor_transforms import TensorGeometry, exif_transpose, tensor_geometry
from ..images import MAX_DECODE_SIDE, ImageReadError, load_image
from .cache import source_fingerprint

log = logging.getLogger(__name__)


def worker_context(num_workers: int):
    """The platform's default multiprocessing start method for DataLoader workers, named explicitly: inside a
    worker of a parallel sweep (hydra/launcher=parallel, joblib's loky) the inherited default is loky's own
    context, whose processes DataLoader cannot start ("'Process' object has no attribute 'env'")."""
    import multiprocessing

    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0]) if num_workers > 0 else None


def decode_path(transform, decode: str) -> str:
    """The decode path an extraction with `transform` takes when asked for `decode` (pil | device): `device` only
    when the transform's per-image stage has a tensor twin (`tensor_geometry`), else `pil`. Part of the cache key."""
    if decode not in DECODES:
        raise ValueError(f"decode={decode!r}: expected one of {' | '.join(DECODES)} (features.decode, after auto is "
                         "resolved by captioner.config.resolve_decode)")
    if decode == "device" and _device_geometry(*split_transform(transform)) is None:
        log.info("features.decode=device: the transform %r has a step with no tensor twin; decoding with PIL",
                 transform)
        return "pil"
    return decode


def _device_geometry(image_stage, batch_stage) -> TensorGeometry | None:
    # the device path hands uint8 images to the batch stage: a transform without one keeps PIL
    return tensor_geometry(image_stage) if batch_stage is not None else None


def _pil_item(path: Path, image_stage, input_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """(image after `image_stage`, "") or, for an unreadable file, (zeros, why): the PIL path, for one file."""
    try:
        return image_stage(load_image(path)), ""
    except ImageReadError as e:  # a zero image keeps the batch shape; its row is zeroed and listed as failed
        return torch.zeros(3, input_size, input_size, dtype=dtype), str(e)


_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a phone's JPEG with extra frames appended; both paths decode the first
_EOI = b"\xff\xd9"
_ORIENTATION = 0x0112  # the EXIF tag


class RawJpeg(NamedTuple):
    """A JPEG file's bytes (1-D uint8, for decode_jpeg) and its EXIF orientation, as PIL reads it."""

    data: torch.Tensor
    orientation: int


def device_jpeg(path: Path, data: bytes | None = None) -> RawJpeg | None:
    """The bytes of `path` when it is a JPEG that `decode_jpeg` turns into the pixels `load_image` gives: baseline
    or progressive, RGB or grey, longer side at most MAX_DECODE_SIDE (larger ones need PIL's reduced-scale decode).
    None for anything else, and for any problem: the PIL path then reads the file and reports the problem in
    load_image's words. The orientation is read by PIL (EXIF, else XMP), as ImageOps.exif_transpose reads it.
    `data`: the file's bytes when the caller has read them already (with its fingerprint: `source_fingerprint`)."""
    if data is None:
        blocks: list[bytes] = []
        if source_fingerprint(path, blocks) is None:  # missing, not a regular file, unreadable
            return None
        data = b"".join(blocks)
    # A truncated JPEG lacks its end marker: PIL refuses it, a GPU decoder may fill in grey; so PIL decides (a
    # complete JPEG with bytes appended after the marker also goes there, which costs only speed).
    if not data.endswith(_EOI):
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.format not in _JPEG_FORMATS or im.mode not in ("RGB", "L") or max(im.size) > MAX_DECODE_SIDE:
                return None
            orientation = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - whatever PIL finds wrong, load_image reports it
        return None
    return RawJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)


class _ImageFiles(Dataset):
    """Decodes + resizes images (in DataLoader workers when there are any, in parallel with the encoder forward);
    `image_stage` ends in a uint8 tensor when the batch stage of `split_transform` normalises whole batches. Each
    item is (image, why it could not be read or "", the file's fingerprint taken before it was decoded). With
    `raw_jpegs` (decode=device), a plain JPEG's item holds its bytes instead (a `RawJpeg`, not decoded)."""

    def __init__(self, paths: Sequence[Path], image_stage, input_size: int, dtype: torch.dtype,
                 raw_jpegs: bool = False) -> None:
        self.paths, self.image_stage, self.input_size, self.dtype = list(paths), image_stage, input_size, dtype
        self.raw_jpegs = raw_jpegs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path, blocks = self.paths[i], []
        fingerprint = source_fingerprint(path, blocks if self.raw_jpegs else None)  # one read gives the JPEG too
        if self.raw_jpegs and fingerprint is not None and (data := device_jpeg(path, b"".join(blocks))) is not None:
            return data, "", fingerprint
        return (*_pil_item(path, self.image_stage, self.input_size, self.dtype), fingerprint)


def _collate_images(items: list[tuple]) -> tuple[torch.Tensor, list[str], list]:
    images, errors, fingerprints = zip(*items)
    return torch.stack(images), list(errors), list(fingerprints)


def _collate_payloads(items: list[tuple]) -> tuple[list[torch.Tensor | RawJpeg], list[str], list]:
    # JPEG bytes and finished images differ in shape: stacked by _DeviceDecoder, after decoding
    payloads, errors, fingerprints = zip(*items)
    return list(payloads), list(errors), list(fingerprints)


class _DeviceDecoder:
    """The main-process half of decode=device: a batch's JPEG bytes decoded together on `device`, resized there by
    `geometry`, and stacked with the images the workers finished with PIL. A JPEG the device cannot decode (a
    corrupt but plausible file) takes the PIL path here, so its pixels or its error are those of decode=pil."""

    def __init__(self, geometry: TensorGeometry, image_stage, input_size: int, device) -> None:
        self.geometry, self.image_stage, self.input_size = geometry, image_stage, input_size
        self.device = torch.device(device)

    def __call__(self, payloads: list[torch.Tensor | RawJpeg], errors: list[str],
                 paths: list[Path]) -> tuple[torch.Tensor, list[str]]:
        images, errors = list(payloads), list(errors)
        jpegs = [i for i, p in enumerate(payloads) if isinstance(p, RawJpeg)]
        for i, decoded in zip(jpegs, self._decode([payloads[i].data for i in jpegs])):
            if decoded is None:
                images[i], errors[i] = _pil_item(paths[i], self.image_stage, self.input_size, torch.uint8)
            else:
                images[i] = self.geometry(exif_transpose(decoded, payloads[i].orientation))
        return torch.stack([image.to(self.device, non_blocking=True) for image in images]), errors

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each JPEG decoded to uint8 RGB (3, H, W) on the device, as stored (decode_jpeg applies EXIF rotation only
        on CPU: `exif_transpose` does, on every device); None where it fails."""
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(x):
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency); they still work
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(x, device=self.device, mode=ImageReadMode.RGB)

        if not data:
            return []
        try:
            return list(decode(data))
        except RuntimeError:  # one bad file fails the whole batch: decode one by one to find it
            out = []
            for x in data:
                try:
                    out.append(decode(x))
                except RuntimeError:
                    out.append(None)
            return out


def encode_batches(encoder: FrozenEncoder, records: Sequence[CaptionRecord], rows: Sequence[int],
                   arrays: dict[str, np.memmap], batch_size: int, num_workers: int, device,
                   bar, decode: str = "pil") -> Iterator[tuple[list[int], dict[str, str], list]]:
    """Encode `records[rows]` in batches of `batch_size` into those rows of `arrays`; after each batch yield
    (its rows, {key: why} of its unreadable images, whose rows are zeroed, and its images' fingerprints).
    `decode`: pil | device (see the module's docstring; `decode_path` says which one a transform allows)."""
    if not len(rows):
        return
    transform = encoder.transform()
    image_stage, batch_stage = split_transform(transform)
    dtype = torch.uint8 if batch_stage is not None else torch.float32
    decoder = None
    if decode_path(transform, decode) == "device":
        decoder = _DeviceDecoder(_device_geometry(image_stage, batch_stage), image_stage, encoder.spec.input_size,
                                 device)
    elif decode != "pil":
        raise ValueError(f"decode=device was asked for, but the transform of encoder {encoder.spec.name} cannot be "
                         "mirrored on the device; pass decode=decode_path(transform, decode) (and key the cache "
                         "with it)")
    loader = DataLoader(
        _ImageFiles([records[i].image for i in rows], image_stage, encoder.spec.input_size, dtype,
                    raw_jpegs=decoder is not None),
        batch_size=batch_size, num_workers=num_workers, shuffle=False,
        collate_fn=_collate_images if decoder is None else _collate_payloads,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None, multiprocessing_context=worker_context(num_workers),
    )
    pos = 0
    with torch.inference_mode():
        for images, errors, fingerprints in loader:
            batch = list(rows[pos:pos + len(images)])
            if decoder is not None:
                images, errors = decoder(images, errors, [records[row].image for row in batch])
            images = images.to(device, non_blocking=True)
            g, s = encoder(batch_stage(images) if batch_stage is not None else images)
            out = {"global.npy": g, "spatial.npy": s}
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
                  on_range: Callable[[int, int, dict[str, str], list], None], bar, decode: str = "pil") -> None:
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
                                                                  num_workers, device, bar, decode):
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
