"""The feature cache: run the frozen encoder once per (dataset, split, encoder, weights, transform, input size).

Layout under `cache_dir`:
  <key>/manifest.json   keys (image order), shapes, encoder spec, unreadable images, batch size, and the sha256 of
                        every chunk of `chunk_rows` rows of each array
  <key>/global.npy      (N, D)    float16
  <key>/spatial.npy     (N, T, D) float16   (only when a config needs spatial tokens)
  <key>/verified.json   (size, mtime, inode) of each array when its checksums last matched
  <key>.partial/        an extraction in progress: the arrays, plan.json (batch/chunk sizes, chunks verified
                        as done when it started) and progress.<rank>.json (the chunks each process has done since)
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
    """A writable memmap of a .npy file of `shape`; with `create` a new zero-filled (sparse) file, otherwise the
    existing one with its header rewritten and its size set to what the shape needs (repairing a damaged file's
    layout; the damaged rows are then re-extracted by the caller)."""
    header = _npy_header(shape)
    # O_NOFOLLOW: a cache file replaced by a symbolic link is never written through (it could point anywhere)
    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_TRUNC if create or not path.exists() else 0)
    with os.fdopen(os.open(path, flags, 0o666), "r+b") as f:
        f.write(header)
        f.truncate(len(header) + shape[0] * _row_bytes(shape))
    return _map_array(path, shape, "r+")


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

class _ImageFiles(Dataset):
    """Decodes + resizes images (in DataLoader workers when there are any, in parallel with the encoder forward);
    `image_stage` ends in a uint8 tensor when the batch stage of `split_transform` normalises whole batches."""

    def __init__(self, paths: Sequence[Path], image_stage, input_size: int, dtype: torch.dtype) -> None:
        self.paths, self.image_stage, self.input_size, self.dtype = list(paths), image_stage, input_size, dtype

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.image_stage(load_image(self.paths[i])), ""
        except ImageReadError as e:  # a zero image keeps the batch shape; its row is zeroed and listed as failed
            return torch.zeros(3, self.input_size, self.input_size, dtype=self.dtype), str(e)


def _encode_ranges(encoder: FrozenEncoder, records: Sequence[CaptionRecord], ranges: list[tuple[int, int]],
                   arrays: dict[str, np.memmap], batch_size: int, num_workers: int, device,
                   on_range: Callable[[int, int, dict[str, str]], None], bar) -> None:
    """Encode the rows of each [a, b) range into `arrays`; after each range, `on_range(a, b, failed)`.

    Every range starts at a multiple of `batch_size` and all but the array's last chunk are whole multiples of it,
    so the batches are exactly those of an extraction in one go, and so are the resulting bytes.
    """
    rows = [i for a, b in ranges for i in range(a, b)]
    if not rows:
        return
    image_stage, batch_stage = split_transform(encoder.transform())
    dtype = torch.uint8 if batch_stage is not None else torch.float32
    loader = DataLoader(
        _ImageFiles([records[i].image for i in rows], image_stage, encoder.spec.input_size, dtype),
        batch_size=batch_size, num_workers=num_workers, shuffle=False,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None, multiprocessing_context=worker_context(num_workers),
    )
    pending = iter(ranges)
    a, b = next(pending)
    pos, failed = a, {}
    with torch.inference_mode():
        for images, errors in loader:
            images = images.to(device, non_blocking=True)
            g, s = encoder(batch_stage(images) if batch_stage is not None else images)
            out = {"global.npy": g, "spatial.npy": s}
            n = images.shape[0]
            assert pos + n <= b, "a batch straddles two chunks"
            for name, array in arrays.items():
                array[pos:pos + n] = out[name].to("cpu", torch.float16).numpy()
            for j, err in enumerate(errors):
                if err:
                    failed[records[pos + j].key] = err
                    for array in arrays.values():
                        array[pos + j] = 0
            pos += n
            bar.update(n)
            if pos == b:
                on_range(a, b, failed)
                failed = {}
                a, b = next(pending, (None, None))
                pos = a


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
        for name, shape in shapes.items():
            _open_array(partial / name, shape, create=True)
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

    def chunk_done(a: int, b: int, failed: dict[str, str]) -> None:
        _flush(arrays)
        recorded[str(a // plan["chunk_rows"])] = {
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
        atomic_write_text(partial / "manifest.json", json.dumps(manifest))
        # A kill between these lines leaves a complete .partial/ with its progress: the next run only renames it.
        os.replace(partial, final)
        fsync_dir(final.parent)
        for f in [final / "plan.json", *final.glob("progress.*.json")]:
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
    changed = []

    def chunk_done(a: int, b: int, chunk_failed: dict[str, str]) -> None:
        _flush(arrays)
        c = a // chunk_rows
        for name, array in arrays.items():
            digest = _digest(array[a:b])
            if digest != manifest["chunks"][name][c]:
                changed.append(f"{name} rows {a}-{b - 1}")
                manifest["chunks"][name][c] = digest
        failed.update(chunk_failed)

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


def _warn_failed(cache: FeatureCache, label: str) -> None:
    if cache.failed:
        log.warning("%d image(s) of %s could not be read and are left out: %s%s. Fix or remove them; after fixing, "
                    "delete %s so that they are extracted again.", len(cache.failed), label,
                    "; ".join(list(cache.failed.values())[:5]), " ..." if len(cache.failed) > 5 else "", cache.path)


def _open_or_build(cache_dir: Path, key: str, records: Sequence[CaptionRecord],
                   get_encoder: Callable[[], FrozenEncoder], label: str, spatial: bool = False, batch_size: int = 8,
                   num_workers: int = 2, flush_every: int = 32, progress: bool = True,
                   device: str | torch.device = "cpu", group: ExtractionGroup = SOLO) -> FeatureCache:
    """The verified cache `<cache_dir>/<key>` of these records, built, resumed or repaired as needed. Rank 0 holds
    the entry's lock throughout (other jobs wait) and decides; a build is shared by every rank of `group`, a repair
    (a few damaged chunks) is rank 0's alone. `get_encoder` is only called when something has to be encoded."""
    final = cache_dir / key
    lock = _exclusive_lock(cache_dir / f"{key}.lock", label) if group.rank == 0 else contextlib.nullcontext()
    if group.rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
    with lock:
        ready = group.broadcast(_open_or_repair(final, records, get_encoder, label, num_workers, progress, device)
                                if group.rank == 0 else None)
        if not ready:
            _build(final, records, get_encoder(), label, spatial, batch_size, num_workers, flush_every, progress,
                   device, group)
        else:
            group.barrier()
    cache = FeatureCache.open(final, verify=False)  # verified by rank 0, or every chunk checksummed while written
    if group.rank == 0:
        _warn_failed(cache, label)
    return cache


def _remove_entry(final: Path) -> None:
    """Delete a cache entry; links are unlinked, not followed (rmtree refuses a link, and skips into none)."""
    if final.is_symlink():
        final.unlink()
    else:
        shutil.rmtree(final)


def _open_or_repair(final: Path, records: Sequence[CaptionRecord], get_encoder: Callable[[], FrozenEncoder],
                    label: str, num_workers: int, progress: bool, device) -> bool:
    """True when `final` holds a verified cache of these records (repairing damaged chunks first); False when it
    must be built (absent, or damaged beyond repair: then it is removed)."""
    if final.is_symlink() or (final.is_dir() and any(p.is_symlink() for p in final.iterdir())):
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
        return True
    except CacheDamagedError as e:
        log.warning("%s", e)
        if e.chunks is not None:
            _repair(final, e.chunks, records, get_encoder(), label, num_workers, progress, device)
            FeatureCache.open(final)  # verified again: damage that persists is an error
            return True
        _remove_entry(final)
        return False


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
