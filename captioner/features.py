"""The feature cache: run the frozen encoder once per (dataset, split, encoder, weights, transform, input size).

Layout under `cache_dir`:
  <key>/manifest.json   keys (image order), shapes, encoder spec, unreadable images, batch size, and the sha256 of
                        every chunk of `chunk_rows` rows of each array
  <key>/global.npy      (N, D)    float16
  <key>/spatial.npy     (N, T, D) float16   (only when a config needs spatial tokens)
  <key>/verified.json   (size, mtime, inode) of each array when its checksums last matched
  <key>/sources.json    the fingerprint of each row's image when it was encoded: size, mtime, ctime, inode, when
                        it was taken, and the sha256 of its bytes (`source_fingerprint`)
  <key>.partial/        an extraction in progress: the arrays, plan.json (batch/chunk sizes, chunks verified
                        as done when it started), progress.<rank>.json (the chunks each process has done since)
                        and sources.<chunk>.json (the fingerprints of each done chunk's images)
  <key>.lock            flock'ed by the process that checks, builds or repairs <key>
Training opens the arrays with `np.load(mmap_mode="r", allow_pickle=False)`: nothing is loaded whole into RAM, and
a cache file can never run code (a pickled .npy is refused).

Guarantees (tests/test_reliability.py has a test for each):
- Unreadable images (missing, empty, truncated, corrupt, not an image) never stop an extraction: their rows are
  zeros, `manifest["failed"]` / `FeatureCache.failed` name each with the reason, and a warning lists them.
- `kill -9` at any moment loses at most the chunk being written. Rows are flushed (msync) before a progress file
  records them with their checksums, and progress files are replaced atomically. The next run re-checks the recorded
  chunks, encodes only the rest, with the recorded batch and chunk sizes, so the result is byte-identical to an
  uninterrupted extraction. Only a finished extraction is renamed to `<key>/`: a half-written cache never looks
  complete.
- Damage on disk is detected when a cache is opened. The size and .npy header of each array are always checked
  (cheap); the chunk checksums are checked whenever the file changed since it last verified, by size, mtime or
  inode (hashing GBs of features on every open would cost seconds; a verification only counts when made 2 s or
  more after the file's last write, because file timestamps are coarse). Only the damaged chunks are re-extracted;
  a cache whose manifest is unreadable is rebuilt.
- A cached feature never outlives a change of its source image. Every open compares each image's size, mtime,
  ctime and inode with its fingerprint (one stat an image); an image whose stat differs (or was fingerprinted
  within 2 s of its last change) is hashed again, and only when its bytes differ (replaced, edited, deleted, made
  readable after failing) is its row re-extracted, alone; the log names them. An image that is only touched keeps
  its features. Caches written before fingerprints re-extract the images changed after their manifest.
- Faults are one message naming the path: a full disk (`DiskFullError`; the arrays are allocated when created, so
  the disk cannot fill up under a memory map, and an extraction that could not even allocate them leaves nothing
  behind), a cache directory this process may not write (`CacheNotWritableError`; a complete, valid cache in a
  read-only directory is used as it is).
- A symbolic link anywhere in an entry, its `.partial/` folder or its lock file is damage: removed (the link, never
  its target) and rebuilt; no file is opened for writing through a link.
- Concurrent jobs (two runs on one dataset) never build the same cache together: the first holds
  `<key>.lock`, the others log "waiting for another process building ..." and then open its result. The kernel
  drops the lock when its holder dies, kill -9 included, so a lock is never stale.
- The ranks of one DDP job (an `ExtractionGroup`) share a build: each encodes every world-th chunk still to do into
  the same arrays, rank 0 finalises. Chunks are whole batches, so the bytes equal a one-process extraction's.
- manifest.json, plan.json, progress.<rank>.json and verified.json are written to a temp file, fsync'ed and renamed
  into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import stat
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data.records import CaptionRecord
from .encoders import EncoderSpec, FrozenEncoder, spec_transform, split_transform, transform_signature
from .errors import NO_PERMISSION, NO_SPACE, UserError, disk_full
from .files import atomic_write_text, fsync_dir
from .images import ImageReadError, load_image

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent builds of one cache are then not prevented
    fcntl = None

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # the arrays' layout; it did not change when manifests gained per-chunk checksums
DTYPE = np.dtype("<f2")
ARRAYS = ("global.npy", "spatial.npy")
STAMP = "verified.json"
SOURCES = "sources.json"
RACY_NS = 2_000_000_000  # a verification younger than this after the file's last write is not trusted later


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


class CacheNotWritableError(UserError, PermissionError):
    """The cache directory may not be written (permissions, a read-only filesystem) and a cache must be written."""


def not_writable(path: Path, what: str, error: OSError) -> CacheNotWritableError:
    return CacheNotWritableError(
        f"{error.filename or path}: cannot write the feature cache there ({error.strerror}); {what}. Make "
        f"{path} writable, or point the cache at a directory you can write (paths.cache_dir=...)")


class CacheDamagedError(RuntimeError):
    """A cache entry on disk does not match its manifest.

    `chunks` lists the damaged chunk indices (re-extracting them repairs the entry); None means the entry cannot
    be repaired (no readable manifest) and must be rebuilt.
    """

    def __init__(self, path: Path, problems: list[str], chunks: list[int] | None) -> None:
        self.path, self.problems, self.chunks = path, problems, chunks
        fix = "rebuilt" if chunks is None else "repaired (only the damaged rows are re-extracted)"
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"feature cache {path} is damaged: {'; '.join(problems[:5])}{more}. It is {fix} "
                         f"automatically the next time its features are prepared (training or "
                         f"python -m captioner.prepare); or delete {path} to rebuild it from scratch.")


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
    def open(cls, path: Path, verify: bool = True) -> "FeatureCache":
        """Memory-map a finished entry; with `verify`, raise CacheDamagedError if it does not match its manifest."""
        path = Path(path)
        manifest = _read_manifest(path)
        if verify:
            problems, damaged = _check_arrays(path, manifest)
            if problems:
                raise CacheDamagedError(path, problems, damaged)
        # allow_pickle=False is numpy's default; spelled out because a pickled .npy could run code when loaded.
        pooled = np.load(path / "global.npy", mmap_mode="r", allow_pickle=False)
        spatial = (np.load(path / "spatial.npy", mmap_mode="r", allow_pickle=False) if manifest["spatial"]
                   else None)
        return cls(path, manifest["keys"], pooled, spatial, tuple(manifest["grid"]), manifest.get("failed", {}))


# --- files: atomic JSON, .npy arrays, checksums -------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_manifest(path: Path) -> dict:
    manifest = _read_json(path / "manifest.json")
    try:
        shapes = _manifest_shapes(manifest)
        usable = True
        if "chunk_rows" in manifest:  # per-chunk checksums: one per chunk of every array
            count = math.ceil(len(manifest["keys"]) / manifest["chunk_rows"])
            usable = (manifest["chunk_rows"] % manifest["batch_size"] == 0
                      and all(len(manifest["chunks"][name]) == count for name in shapes))
    except (TypeError, KeyError, ValueError, ZeroDivisionError):  # not JSON, fields missing or of the wrong type
        usable = False
    if not usable:  # nothing in it can be trusted
        raise CacheDamagedError(path, [f"{path / 'manifest.json'} is missing or unreadable"], None)
    return manifest


def _shapes(n: int, dim: int, tokens: int, spatial: bool) -> dict[str, tuple[int, ...]]:
    shapes = {"global.npy": (n, dim)}
    if spatial:
        shapes["spatial.npy"] = (n, tokens, dim)
    return shapes


def _manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    return _shapes(len(manifest["keys"]), manifest["dim"], math.prod(manifest["grid"]), manifest["spatial"])


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The exact header np.save writes for a C-order float16 array of `shape`: comparing it byte for byte checks
    dtype and shape, and refuses an object (pickled) array, without parsing anything from the file."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _row_bytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) * DTYPE.itemsize


def _open_array(path: Path, shape: tuple[int, ...], create: bool) -> np.memmap:
    """A writable memmap of a .npy file of `shape`; with `create` a new zero-filled file, otherwise the existing
    one with its header rewritten and its size set to what the shape needs (repairing a damaged file's layout; the
    damaged rows are then re-extracted by the caller). A full disk is a DiskFullError naming the file."""
    header = _npy_header(shape)
    size = len(header) + shape[0] * _row_bytes(shape)
    # O_NOFOLLOW: a cache file replaced by a symbolic link is never written through (it could point anywhere)
    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_TRUNC if create or not path.exists() else 0)
    try:
        with os.fdopen(os.open(path, flags, 0o666), "r+b") as f:
            f.write(header)
            f.truncate(size)
            _allocate(f.fileno(), size)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise disk_full(path, e) from None
        raise
    return _map_array(path, shape, "r+")


def _allocate(fd: int, size: int) -> None:
    """Reserve the file's blocks now: rows are written through a memory map, and a disk that fills up under a
    map kills the process with SIGBUS instead of raising an error (copy-on-write filesystems may still do so)."""
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in NO_SPACE:
                raise
            # EOPNOTSUPP/EINVAL: a filesystem without allocation; the rows are written into a sparse file


def _map_array(path: Path, shape: tuple[int, ...], mode: str) -> np.memmap:
    """The rows of an existing .npy file of `shape` written by this module (its header already checked)."""
    return np.memmap(path, dtype=DTYPE, mode=mode, offset=len(_npy_header(shape)), shape=shape)


def _digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows)).hexdigest()


def _file_digest(f, offset: int, size: int) -> str:
    f.seek(offset)
    return hashlib.sha256(f.read(size)).hexdigest()


def _chunk_ranges(n: int, chunk_rows: int, chunks: Sequence[int] | None = None) -> list[tuple[int, int]]:
    indices = range(math.ceil(n / chunk_rows)) if chunks is None else chunks
    return [(c * chunk_rows, min(n, (c + 1) * chunk_rows)) for c in indices]


def _check_arrays(path: Path, manifest: dict) -> tuple[list[str], list[int] | None]:
    """(problems, damaged chunk indices) of a finished entry; ([], []) when it matches its manifest.

    Sizes and headers are always checked; checksums only for files that changed since they last verified.
    Manifests written before per-chunk checksums carry one sha256 per file: damage there means a rebuild (None).
    """
    n = len(manifest["keys"])
    chunk_rows = manifest.get("chunk_rows")
    all_chunks = list(range(math.ceil(n / chunk_rows))) if chunk_rows else None
    stamp = _read_json(path / STAMP) or {}
    new_stamp: dict[str, list[int]] = {}
    problems: list[str] = []
    damaged: set[int] = set()
    for name, shape in _manifest_shapes(manifest).items():
        file = path / name
        header, row_bytes = _npy_header(shape), _row_bytes(shape)
        expected = len(header) + n * row_bytes
        try:
            st = file.stat()
            with open(file, "rb") as f:
                head = f.read(len(header))
        except OSError as e:
            problems.append(f"{file} cannot be read ({type(e).__name__}: {e})")
            damaged.update(all_chunks or [])
            continue
        intact = head == header and st.st_size == expected
        if head != header:
            problems.append(f"{file} does not start with the .npy header of a float16 array of shape {shape}")
        elif st.st_size != expected:
            problems.append(f"{file} has {st.st_size} bytes, expected {expected} for shape {shape} (truncated or "
                            "overwritten)")
        signature = [st.st_size, st.st_mtime_ns, st.st_ino]
        old = stamp.get(name)
        if intact and old and old[:3] == signature and old[3] - st.st_mtime_ns >= RACY_NS:
            new_stamp[name] = old  # unchanged since a trusted verification: not re-hashed
            continue
        if all_chunks is None:  # an older manifest: one checksum for the whole file
            if manifest.get("sha256", {}).get(name) not in (None, _sha256(file)):
                problems.append(f"{file} fails its checksum")
            elif intact:
                new_stamp[name] = signature + [time.time_ns()]
            continue
        if head != header:
            bad = all_chunks  # rows behind a foreign header cannot be trusted (nor located): all come back
        else:
            with open(file, "rb") as f:  # a chunk past the end of a truncated file reads short and fails
                bad = [c for c, (a, b) in enumerate(_chunk_ranges(n, chunk_rows))
                       if _file_digest(f, len(header) + a * row_bytes, (b - a) * row_bytes)
                       != manifest["chunks"][name][c]]
        if bad and head == header:
            rows = ", ".join(f"{a}-{b - 1}" for a, b in _chunk_ranges(n, chunk_rows, bad))
            problems.append(f"{file} rows {rows} fail their checksum")
        damaged.update(bad)
        if intact and not bad:
            new_stamp[name] = signature + [time.time_ns()]
    if not problems and new_stamp != stamp:
        try:
            atomic_write_text(path / STAMP, json.dumps(new_stamp))
        except OSError:  # a read-only cache (shared disk): it is simply verified again next time
            pass
    if problems and all_chunks is None:
        return problems, None  # no per-chunk checksums to repair by: rebuild
    return problems, sorted(damaged)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- encoding rows ------------------------------------------------------------------------------------------------

def source_fingerprint(path: Path) -> list | None:
    """[size, mtime_ns, ctime_ns, inode, taken_ns, sha256 (first 128 bits, hex)] of an image file as it is now, or
    None when it cannot be read. The stat comes from the descriptor that is hashed, before the bytes are read: a
    file changed while being hashed differs from its fingerprint later, so it is looked at again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a pipe named like an image must not hang
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        taken, digest = time.time_ns(), hashlib.sha256()
        try:
            while block := f.read(1 << 20):
                digest.update(block)
        except OSError:
            return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, taken, digest.hexdigest()[:32]]


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


def _encode_batches(encoder: FrozenEncoder, records: Sequence[CaptionRecord], rows: Sequence[int],
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


def _encode_ranges(encoder: FrozenEncoder, records: Sequence[CaptionRecord], ranges: list[tuple[int, int]],
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
    for batch, batch_failed, batch_fingerprints in _encode_batches(encoder, records, rows, arrays, batch_size,
                                                                   num_workers, device, bar):
        assert batch[-1] < b, "a batch straddles two chunks"
        failed.update(batch_failed)
        fingerprints.extend(batch_fingerprints)
        if batch[-1] == b - 1:
            on_range(a, b, failed, fingerprints)
            failed, fingerprints = {}, []
            a, b = next(pending, (None, None))


def _flush(arrays: dict[str, np.memmap]) -> None:
    for array in arrays.values():
        array.flush()  # msync: the rows are on disk before any JSON file says they are done


# --- building, resuming, repairing ---------------------------------------------------------------------------------

@contextmanager
def _exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block; wait (saying so) while another process holds it.

    A lock file whose *existence* means "locked" would stay behind after a kill -9; an flock is released by the
    kernel when its holder dies. The file is never deleted: a process that deleted it could let a third process
    lock a fresh file while a second one still waits on the old one.
    """
    if fcntl is None:
        yield
        return
    try:
        if path.is_symlink():  # planted: opening it with O_CREAT would create (or lock) whatever it points at
            path.unlink()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:  # e.g. a read-only shared cache: opening a finished cache needs no lock
        log.info("cannot create lock file %s (%s); not guarding against concurrent builds", path, e)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process building or checking the feature cache of %s (it holds %s); "
                        "its result is reused", what, path)
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.info("lock %s acquired after %.1f s", path, time.monotonic() - start)
        yield
    finally:
        os.close(fd)  # releases the lock


class ExtractionGroup:
    """The processes that extract one cache together: this one's `rank` of `world`, and how they meet.

    One process (the default): rank 0 of 1, nothing to coordinate. Under DDP (`from_torch_distributed()`) every
    rank encodes its share of the chunks into the same `<key>.partial/` arrays; rank 0 alone decides, plans and
    finalises, and the others follow it through `broadcast` and `barrier`.
    """

    def __init__(self, rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None,
                 broadcast: Callable[[object], object] | None = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.rank, self.world = rank, world
        self._barrier, self._broadcast = barrier, broadcast

    @classmethod
    def from_torch_distributed(cls) -> "ExtractionGroup":
        """The initialised torch.distributed process group, or one process when there is none."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()

        def broadcast(obj):
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        return cls(dist.get_rank(), dist.get_world_size(), dist.barrier, broadcast)

    def barrier(self) -> None:
        if self.world > 1:
            self._barrier()

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        return obj if self.world == 1 else self._broadcast(obj)


SOLO = ExtractionGroup()


def _recorded_chunks(partial: Path) -> dict[int, dict]:
    """Chunks an interrupted extraction recorded as done, from plan.json and every rank's progress file:
    {chunk: {"digests": {array: sha256}, "failed": {key: reason}}}."""
    plan = _read_json(partial / "plan.json") or {}
    recorded = {int(c): v for c, v in plan.get("done", {}).items()}
    for f in sorted(partial.glob("progress.*.json")):
        recorded.update({int(c): v for c, v in (_read_json(f) or {}).get("chunks", {}).items()})
    return recorded


def _plan(partial: Path, n: int, shapes: dict[str, tuple[int, ...]], batch_size: int, flush_every: int,
          label: str) -> dict:
    """Rank 0: create `<key>.partial/` or take over an interrupted one, and write plan.json: the batch and chunk
    sizes (an interrupted run's, so that its rows stay byte-identical) and the recorded chunks whose rows still
    match their checksums. Every other chunk is left to encode."""
    if _is_or_holds_link(partial):  # written only by this module, as plain files: a link is damage
        log.warning("%s is or holds a symbolic link: removed (the links only) and extracted again", partial)
        _remove_entry(partial)
    plan = _read_json(partial / "plan.json")
    usable = (plan is not None and plan.get("n") == n and plan.get("shapes") == {k: list(v) for k, v in shapes.items()}
              and isinstance(plan.get("batch_size"), int) and isinstance(plan.get("chunk_rows"), int))
    for name, shape in shapes.items():
        header = _npy_header(shape)
        try:
            with open(partial / name, "rb") as f:
                usable = usable and f.read(len(header)) == header
            usable = usable and (partial / name).stat().st_size == len(header) + shape[0] * _row_bytes(shape)
        except OSError:
            usable = False
    done: dict[int, dict] = {}
    if usable:
        recorded = _recorded_chunks(partial)
        arrays = {name: _map_array(partial / name, shape, "r") for name, shape in shapes.items()}
        ranges = _chunk_ranges(n, plan["chunk_rows"])
        done = {c: v for c, v in recorded.items() if c < len(ranges) and set(v["digests"]) == set(shapes)
                and all(_digest(arrays[name][slice(*ranges[c])]) == v["digests"][name] for name in shapes)}
        del arrays
        if (plan["batch_size"], plan["chunk_rows"]) != (batch_size, batch_size * flush_every):
            log.info("resuming with the interrupted run's batch size %d and chunk size %d, so that its features "
                     "are byte-identical to an uninterrupted run", plan["batch_size"], plan["chunk_rows"])
        log.info("resuming feature extraction of %s: %d of %d images already done", label,
                 sum(b - a for c, (a, b) in enumerate(ranges) if c in done), n)
    else:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            for name, shape in shapes.items():
                _open_array(partial / name, shape, create=True)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # nothing extracted yet: give the space back at once
            raise
        plan = {"n": n, "shapes": {k: list(v) for k, v in shapes.items()}, "batch_size": batch_size,
                "chunk_rows": batch_size * flush_every}
    plan["done"] = {str(c): v for c, v in sorted(done.items())}
    atomic_write_text(partial / "plan.json", json.dumps(plan))
    for f in partial.glob("progress.*.json"):  # what they recorded (and still holds) is in plan.json now
        f.unlink()
    return plan


def _build(final: Path, records: Sequence[CaptionRecord], encoder: FrozenEncoder, label: str, spatial: bool,
           batch_size: int, num_workers: int, flush_every: int, progress: bool, device,
           group: ExtractionGroup = SOLO) -> None:
    """Extract into `<key>.partial/` (resuming it when possible) and rename it to `<key>/` when complete.

    With a group of several processes, each encodes every world-th chunk still to do into the shared arrays and
    records it in its own progress.<rank>.json; rank 0 then checks that every chunk is there and finalises. The
    batches are those of a one-process extraction (chunks are whole batches), so are the bytes.
    """
    from tqdm.auto import tqdm

    partial = final.with_name(final.name + ".partial")
    n = len(records)
    shapes = _shapes(n, encoder.dim, encoder.num_tokens, spatial)
    plan = group.broadcast(_plan(partial, n, shapes, batch_size, flush_every, label) if group.rank == 0 else None)
    ranges = _chunk_ranges(n, plan["chunk_rows"])
    mine = [c for c in range(len(ranges)) if str(c) not in plan["done"]][group.rank::group.world]
    arrays = {name: _map_array(partial / name, shape, "r+") for name, shape in shapes.items()}
    progress_file = partial / f"progress.{group.rank}.json"
    recorded: dict[str, dict] = {}

    def chunk_done(a: int, b: int, failed: dict[str, str], fingerprints: list) -> None:
        _flush(arrays)
        chunk = a // plan["chunk_rows"]
        # its own file, written once: in the progress file, rewritten after every chunk, they would cost O(n^2)
        atomic_write_text(partial / f"sources.{chunk}.json", json.dumps(fingerprints))
        recorded[str(chunk)] = {
            "digests": {name: _digest(array[a:b]) for name, array in arrays.items()}, "failed": failed}
        atomic_write_text(progress_file, json.dumps({"chunks": recorded}))

    if group.world > 1:
        log.info("rank %d of %d extracts %d of the %d chunks of %s still to do", group.rank, group.world,
                 len(mine), len(ranges) - len(plan["done"]), label)
    encoder = encoder.to(device)
    todo = [ranges[c] for c in mine]
    bar = tqdm(total=sum(b - a for a, b in todo), desc=f"features {label}", unit="img",
               disable=not progress or group.rank != 0, smoothing=0.1)
    _encode_ranges(encoder, records, todo, arrays, plan["batch_size"], num_workers, device, chunk_done, bar)
    bar.close()
    arrays.clear()  # unmap before the rename
    group.barrier()  # every rank's chunks are on disk and recorded

    if group.rank == 0:
        done = _recorded_chunks(partial)
        missing = [c for c in range(len(ranges)) if c not in done]
        if missing:
            raise RuntimeError(f"feature extraction of {label}: chunks {missing[:10]} were not recorded by any "
                               f"process; run again to resume {partial}")
        failed = {k: v for c in range(len(ranges)) for k, v in done[c]["failed"].items()}
        manifest = {
            "version": FORMAT_VERSION, "label": label, "keys": [r.key for r in records], "spatial": spatial,
            "grid": list(encoder.grid), "dim": encoder.dim, "encoder": encoder.spec.to_dict(),
            "failed": {r.key: failed[r.key] for r in records if r.key in failed},
            "batch_size": plan["batch_size"], "chunk_rows": plan["chunk_rows"],
            "chunks": {name: [done[c]["digests"][name] for c in range(len(ranges))] for name in shapes},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_sources(partial, _chunk_sources(partial, records, ranges))
        atomic_write_text(partial / "manifest.json", json.dumps(manifest))
        # A kill between these lines leaves a complete .partial/ with its progress: the next run only renames it.
        os.replace(partial, final)
        fsync_dir(final.parent)
        for f in [final / "plan.json", *final.glob("progress.*.json"), *final.glob("sources.*.json")]:
            f.unlink(missing_ok=True)
    group.barrier()  # the other ranks open `final` only after the rename


def _repair(path: Path, chunks: list[int], records: Sequence[CaptionRecord], encoder: FrozenEncoder, label: str,
            num_workers: int, progress: bool, device) -> None:
    """Re-extract the rows of the damaged `chunks` in place, with the original batch size."""
    from tqdm.auto import tqdm

    manifest = _read_manifest(path)
    n, chunk_rows = len(records), manifest["chunk_rows"]
    ranges = _chunk_ranges(n, chunk_rows, chunks)
    log.warning("feature cache of %s: re-extracting %d of %d images (damaged rows) in %s", label,
                sum(b - a for a, b in ranges), n, path)
    arrays = {name: _open_array(path / name, shape, create=False)
              for name, shape in _manifest_shapes(manifest).items()}
    redone = {records[i].key for a, b in ranges for i in range(a, b)}
    failed = {k: v for k, v in manifest["failed"].items() if k not in redone}
    recorded_sources = _read_sources(path, n)
    sources = list(recorded_sources or [None] * n)
    changed = []

    def chunk_done(a: int, b: int, chunk_failed: dict[str, str], fingerprints: list) -> None:
        _flush(arrays)
        c = a // chunk_rows
        for name, array in arrays.items():
            digest = _digest(array[a:b])
            if digest != manifest["chunks"][name][c]:
                changed.append(f"{name} rows {a}-{b - 1}")
                manifest["chunks"][name][c] = digest
        failed.update(chunk_failed)
        sources[a:b] = fingerprints

    encoder = encoder.to(device)
    bar = tqdm(total=len(redone), desc=f"repair {label}", unit="img", disable=not progress)
    _encode_ranges(encoder, records, ranges, arrays, manifest["batch_size"], num_workers, device, chunk_done, bar)
    bar.close()
    arrays.clear()
    if changed:
        log.warning("re-extracted %s differ bit-wise from the original extraction (another torch version or "
                    "device?); the manifest now records their new checksums", ", ".join(changed[:5]))
    manifest["failed"] = {r.key: failed[r.key] for r in records if r.key in failed}
    atomic_write_text(path / "manifest.json", json.dumps(manifest))
    if recorded_sources is not None:  # else the whole entry is fingerprinted afterwards (_refresh_changed_images)
        _write_sources(path, sources)


def _warn_failed(cache: FeatureCache, label: str) -> None:
    if cache.failed:
        log.warning("%d image(s) of %s could not be read and are left out: %s%s. Fix or remove them; a fixed "
                    "image is extracted again by the next run.", len(cache.failed), label,
                    "; ".join(list(cache.failed.values())[:5]), " ..." if len(cache.failed) > 5 else "")


def _open_or_build(cache_dir: Path, key: str, records: Sequence[CaptionRecord],
                   get_encoder: Callable[[], FrozenEncoder], label: str, spatial: bool = False, batch_size: int = 8,
                   num_workers: int = 2, flush_every: int = 32, progress: bool = True,
                   device: str | torch.device = "cpu", group: ExtractionGroup = SOLO) -> FeatureCache:
    """The verified cache `<cache_dir>/<key>` of these records, built, resumed or repaired as needed. Rank 0 holds
    the entry's lock throughout (other jobs wait) and decides; a build is shared by every rank of `group`, a repair
    (a few damaged chunks) is rank 0's alone. `get_encoder` is only called when something has to be encoded."""
    final = cache_dir / key
    try:
        if group.rank == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
        lock = _exclusive_lock(cache_dir / f"{key}.lock", label) if group.rank == 0 else contextlib.nullcontext()
        with lock:
            ready = group.broadcast(_open_or_repair(final, records, get_encoder, label, num_workers, progress,
                                                    device) if group.rank == 0 else None)
            if not ready:
                if group.rank == 0:
                    _check_writable(cache_dir)  # before the encoder is built (or downloaded) for nothing
                _build(final, records, get_encoder(), label, spatial, batch_size, num_workers, flush_every,
                       progress, device, group)
            else:
                group.barrier()
    except UserError:
        raise
    except OSError as e:  # the machine's fault, not the suite's: one message naming the path
        if e.errno in NO_SPACE:
            raise disk_full(e.filename or cache_dir, e) from None
        if e.errno in NO_PERMISSION:
            raise not_writable(cache_dir, f"the features of {label} are missing, damaged or stale and have to be "
                                          "written", e) from None
        raise
    cache = FeatureCache.open(final, verify=False)  # verified by rank 0, or every chunk checksummed while written
    if group.rank == 0:
        _warn_failed(cache, label)
    return cache


def _check_writable(cache_dir: Path) -> None:
    probe = cache_dir / f".writable.{os.getpid()}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
    probe.unlink()


def _remove_entry(final: Path) -> None:
    """Delete a cache entry; links are unlinked, not followed (rmtree refuses a link, and skips into none)."""
    if final.is_symlink():
        final.unlink()
    else:
        shutil.rmtree(final)


def _is_or_holds_link(folder: Path) -> bool:
    return folder.is_symlink() or (folder.is_dir() and any(p.is_symlink() for p in folder.iterdir()))


def _open_or_repair(final: Path, records: Sequence[CaptionRecord], get_encoder: Callable[[], FrozenEncoder],
                    label: str, num_workers: int, progress: bool, device) -> bool:
    """True when `final` holds a verified cache of these records (repairing damaged chunks first); False when it
    must be built (absent, or damaged beyond repair: then it is removed)."""
    if _is_or_holds_link(final):
        # a cache is only ever written by this module, as plain files: a link in it is damage, and repairing
        # through it would overwrite whatever it points to
        log.warning("feature cache %s is or holds a symbolic link: removed (the links only, never their targets) "
                    "and built again", final)
        _remove_entry(final)
        return False
    if not final.exists():
        return False
    try:
        cache = FeatureCache.open(final)
        if cache.keys != [r.key for r in records]:
            raise CacheDamagedError(final, ["its manifest lists other images than the dataset"], None)
    except CacheDamagedError as e:
        log.warning("%s", e)
        if e.chunks is None:
            _remove_entry(final)
            return False
        _repair(final, e.chunks, records, get_encoder(), label, num_workers, progress, device)
        FeatureCache.open(final)  # verified again: damage that persists is an error
    if not _refresh_changed_images(final, records, get_encoder, label, num_workers, progress, device):
        _remove_entry(final)
        return False
    return True


# --- source images changed since they were encoded ------------------------------------------------------------------

def _read_sources(path: Path, n: int) -> list | None:
    """The fingerprint of each row's image (None for an image that could not be read), or None when the entry has
    no usable sources.json (written before fingerprints, or damaged)."""
    data = _read_json(path / SOURCES)
    rows = data.get("rows") if data else None
    if not isinstance(rows, list) or len(rows) != n:
        return None
    if not all(r is None or (isinstance(r, list) and len(r) == 6) for r in rows):
        return None
    return rows


def _write_sources(path: Path, rows: list) -> None:
    atomic_write_text(path / SOURCES, json.dumps({"fields": ["size", "mtime_ns", "ctime_ns", "inode", "taken_ns",
                                                             "sha256_128"], "rows": rows}))


def _chunk_sources(partial: Path, records: Sequence[CaptionRecord], ranges: list[tuple[int, int]]) -> list:
    """The fingerprints each chunk recorded when it was encoded; a chunk without them (recorded by an older
    version) is fingerprinted now."""
    rows: list = []
    for c, (a, b) in enumerate(ranges):
        try:
            chunk = json.loads((partial / f"sources.{c}.json").read_text())
        except (OSError, ValueError):
            chunk = None
        if not isinstance(chunk, list) or len(chunk) != b - a:
            chunk = [source_fingerprint(records[i].image) for i in range(a, b)]
        rows.extend(chunk)
    return rows


def _stat_unchanged(old: list | None, path: Path) -> bool:
    """True when the file's stat equals its fingerprint's and that fingerprint was taken RACY_NS or more after the
    file's last change (timestamps are coarse: a write within the same tick would keep them)."""
    try:
        st = os.stat(path)
    except OSError:
        return old is None
    if old is None:
        return False
    size, mtime, ctime, inode, taken, _ = old
    return ((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (size, mtime, ctime, inode)
            and taken - max(mtime, ctime) >= RACY_NS)


def _same_content(old: list | None, new: list | None) -> bool:
    return old is None and new is None or old is not None and new is not None and old[5] == new[5]


def _changed_since_legacy(manifest: dict, path: Path, record: CaptionRecord, new: list | None) -> bool:
    """For an entry written before fingerprints: did the image change after the extraction? Judged by its
    timestamps against the manifest's, conservatively (a false alarm only costs one re-extraction)."""
    if new is None:
        return record.key not in manifest["failed"]
    if record.key in manifest["failed"]:
        return True  # readable now
    return max(new[1], new[2]) > _legacy_written_ns(manifest, path)


def _legacy_written_ns(manifest: dict, path: Path) -> int:
    try:  # the extraction's end, to the second, floored: an image changed in that second counts as changed
        return int(time.mktime(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%S"))) * 1_000_000_000
    except (KeyError, TypeError, ValueError, OverflowError):
        return (path / "manifest.json").stat().st_mtime_ns


def _changed_images(path: Path, manifest: dict, records: Sequence[CaptionRecord]) -> tuple[list[int], list, bool]:
    """(rows whose image's bytes changed since they were encoded, the fingerprints as they are now, whether any
    fingerprint is new). One stat an image; only images whose stat differs are hashed again (all of them once
    for an entry written before fingerprints)."""
    old = _read_sources(path, len(records))
    legacy = old is None
    current = [None] * len(records) if legacy else list(old)
    changed, renewed = [], legacy
    for i, record in enumerate(records):
        if not legacy and _stat_unchanged(old[i], record.image):
            continue
        new = source_fingerprint(record.image)
        if _changed_since_legacy(manifest, path, record, new) if legacy else not _same_content(old[i], new):
            changed.append(i)
        renewed = renewed or new != current[i]
        current[i] = new
    return changed, current, renewed


def _refresh_changed_images(path: Path, records: Sequence[CaptionRecord], get_encoder: Callable[[], FrozenEncoder],
                            label: str, num_workers: int, progress: bool, device) -> bool:
    """Re-extract the rows whose image changed since it was encoded (only those) and record the fingerprints;
    False when the entry must be rebuilt instead (its manifest predates per-chunk checksums)."""
    manifest = _read_manifest(path)
    changed, current, renewed = _changed_images(path, manifest, records)
    if changed:
        names = ", ".join(records[i].key for i in changed[:5]) + (" ..." if len(changed) > 5 else "")
        log.warning("feature cache of %s: %d of %d image(s) changed since their features were extracted (%s): "
                    "re-extracting %s", label, len(changed), len(records), names,
                    "those only" if "chunk_rows" in manifest else f"all (rebuilding {path}, written by an older "
                                                                    "version)")
        if "chunk_rows" not in manifest:
            return False
        _reextract_rows(path, manifest, changed, current, records, get_encoder(), label, num_workers, progress,
                        device)
    elif renewed:
        try:  # touched, copied back or newly fingerprinted: same bytes, so the features stand
            _write_sources(path, current)
        except OSError as e:  # a read-only cache: the images are hashed again next time, nothing is stale
            log.info("cannot record image fingerprints in %s (%s): they are hashed again on every open", path, e)
    return True


def _reextract_rows(path: Path, manifest: dict, rows: list[int], sources: list, records: Sequence[CaptionRecord],
                    encoder: FrozenEncoder, label: str, num_workers: int, progress: bool, device) -> None:
    """Encode `rows` again in place, then record their chunks' checksums, the unreadable images and the
    fingerprints (in this order: a kill in between leaves checksums that fail, or fingerprints that differ, and
    the next run redoes the rows)."""
    from tqdm.auto import tqdm

    shapes = _manifest_shapes(manifest)
    arrays = {name: _open_array(path / name, shape, create=False) for name, shape in shapes.items()}
    redone = {records[i].key for i in rows}
    failed = {k: v for k, v in manifest["failed"].items() if k not in redone}
    bar = tqdm(total=len(rows), desc=f"changed images {label}", unit="img", disable=not progress)
    for batch, batch_failed, fingerprints in _encode_batches(encoder.to(device), records, rows, arrays,
                                                             manifest["batch_size"], num_workers, device, bar):
        failed.update(batch_failed)
        for row, fingerprint in zip(batch, fingerprints):
            sources[row] = fingerprint
    bar.close()
    _flush(arrays)
    chunk_rows = manifest["chunk_rows"]
    for a, b in _chunk_ranges(len(records), chunk_rows, sorted({row // chunk_rows for row in rows})):
        for name, array in arrays.items():
            manifest["chunks"][name][a // chunk_rows] = _digest(array[a:b])
    arrays.clear()
    manifest["failed"] = {r.key: failed[r.key] for r in records if r.key in failed}
    atomic_write_text(path / "manifest.json", json.dumps(manifest))
    _write_sources(path, sources)


def prepare_features(
    records_by_split: dict[str, Sequence[CaptionRecord]],
    spec: EncoderSpec,
    cache_dir: str | Path,
    dataset_id: str,
    spatial: bool = False,
    **extract_kwargs,
) -> dict[str, FeatureCache]:
    """Open (or build) the cache of every split; the encoder is only built when some split must be encoded.
    `extract_kwargs`: batch_size, num_workers, flush_every, progress, device, and `group` (an ExtractionGroup: every
    rank of a DDP job calls this, and each encodes its share of a cache that has to be built)."""
    sig = transform_signature(spec_transform(spec))
    encoder: FrozenEncoder | None = None

    def get_encoder() -> FrozenEncoder:
        nonlocal encoder
        encoder = encoder or FrozenEncoder(spec)
        return encoder

    out: dict[str, FeatureCache] = {}
    for split, records in records_by_split.items():
        key = cache_key(dataset_id, split, [r.key for r in records], spec, sig, spatial)
        out[split] = _open_or_build(Path(cache_dir), key, records, get_encoder, f"{dataset_id}/{split}",
                                    spatial=spatial, **extract_kwargs)
    return out


def worker_context(num_workers: int):
    """The platform's default multiprocessing start method for DataLoader workers, named explicitly: inside a
    worker of a parallel sweep (hydra/launcher=parallel, joblib's loky) the inherited default is loky's own
    context, whose processes DataLoader cannot start ("'Process' object has no attribute 'env'")."""
    import multiprocessing

    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0]) if num_workers > 0 else None


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
    group: ExtractionGroup = SOLO,
) -> FeatureCache:
    """Return the cache for these records, extracting (or resuming, or repairing) it if needed.

    `flush_every` batches make one chunk: the unit of progress after a kill and of repair after damage.
    """
    key = cache_key(dataset_id, split, [r.key for r in records], encoder.spec,
                    transform_signature(encoder.transform()), spatial)
    return _open_or_build(Path(cache_dir), key, records, lambda: encoder, f"{dataset_id}/{split}", spatial=spatial,
                          batch_size=batch_size, num_workers=num_workers, flush_every=flush_every,
                          progress=progress, device=device, group=group)
