"""The feature cache's format on disk, and its verification: is an entry intact, and are its images unchanged?

Layout under `cache_dir`:
  <key>/manifest.json   keys (image order), shapes, encoder spec, unreadable images, batch size, and the sha256 of
                        every chunk of `chunk_rows` rows of each array
  <key>/global.npy      (N, D)    float16
  <key>/spatial.npy     (N, T, D) float16   (only when a config needs spatial tokens)
  <key>/verified.json   (size, mtime, inode) of each array when its checksums last matched
  <key>/sources.json    the fingerprint of each row's image when it was encoded: size, mtime, ctime, inode, when
                        it was taken, and the sha256 of its bytes (`source_fingerprint`)
  <key>.partial/        an extraction in progress (see captioner.features.build)
  <key>.lock            flock'ed by the process that checks, builds or repairs <key>
Training opens the arrays with `np.load(mmap_mode="r", allow_pickle=False)`: nothing is loaded whole into RAM, and
a cache file can never run code (a pickled .npy is refused).

Damage on disk is detected when an entry is opened. The size and .npy header of each array are always checked
(cheap); the chunk checksums whenever the file changed since it last verified, by size, mtime or inode (hashing GBs
of features on every open would cost seconds; a verification only counts when made RACY_NS or more after the file's
last write, because file timestamps are coarse). A changed source image is found by one stat an image against its
fingerprint; only an image whose stat differs is hashed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.records import CaptionRecord
from ..encoders import EncoderSpec
from ..errors import NO_SPACE, UserError, disk_full
from ..files import atomic_write_text

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # the arrays' layout
DTYPE = np.dtype("<f2")
ARRAYS = ("global.npy", "spatial.npy")
STAMP = "verified.json"
SOURCES = "sources.json"
RACY_NS = 2_000_000_000  # a verification younger than this after the file's last write is not trusted later


def cache_key(dataset_id: str, split: str, keys: Sequence[str], spec: EncoderSpec, transform_sig: str,
              spatial: bool, decode: str = "pil") -> str:
    """Hash of everything that determines the features; changing any of them never reuses stale features.
    `decode` (the path `captioner.features.extract.decode_path` chose) is keyed only when not `pil`, so caches
    written before there was a choice keep their keys."""
    payload = json.dumps({
        "version": FORMAT_VERSION, "dataset": dataset_id, "split": split,
        "images": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
        "encoder": spec.timm_name, "weights": spec.weights_id(), "input_size": spec.input_size,
        "transform": transform_sig, "spatial": spatial, **({} if decode == "pil" else {"decode": decode}),
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
        manifest = read_manifest(path)
        if verify:
            problems, damaged = check_arrays(path, manifest)
            if problems:
                raise CacheDamagedError(path, problems, damaged)
        # allow_pickle=False is numpy's default; spelled out because a pickled .npy could run code when loaded.
        pooled = np.load(path / "global.npy", mmap_mode="r", allow_pickle=False)
        spatial = (np.load(path / "spatial.npy", mmap_mode="r", allow_pickle=False) if manifest["spatial"]
                   else None)
        return cls(path, manifest["keys"], pooled, spatial, tuple(manifest["grid"]), manifest.get("failed", {}))


# --- files: JSON, .npy arrays, checksums ----------------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(path: Path) -> dict:
    manifest = read_json(path / "manifest.json")
    try:
        shapes = manifest_shapes(manifest)
        count = math.ceil(len(manifest["keys"]) / manifest["chunk_rows"])  # one checksum per chunk of every array
        usable = (manifest["chunk_rows"] % manifest["batch_size"] == 0
                  and all(len(manifest["chunks"][name]) == count for name in shapes))
    except (TypeError, KeyError, ValueError, ZeroDivisionError):  # not JSON, fields missing or of the wrong type
        usable = False
    if not usable:  # nothing in it can be trusted
        raise CacheDamagedError(path, [f"{path / 'manifest.json'} is missing or unreadable"], None)
    return manifest


def shapes_of(n: int, dim: int, tokens: int, spatial: bool) -> dict[str, tuple[int, ...]]:
    shapes = {"global.npy": (n, dim)}
    if spatial:
        shapes["spatial.npy"] = (n, tokens, dim)
    return shapes


def manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    return shapes_of(len(manifest["keys"]), manifest["dim"], math.prod(manifest["grid"]), manifest["spatial"])


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The exact header np.save writes for a C-order float16 array of `shape`: comparing it byte for byte checks
    dtype and shape, and refuses an object (pickled) array, without parsing anything from the file."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def row_bytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) * DTYPE.itemsize


def open_array(path: Path, shape: tuple[int, ...], create: bool) -> np.memmap:
    """A writable memmap of a .npy file of `shape`; with `create` a new zero-filled file, otherwise the existing
    one with its header rewritten and its size set to what the shape needs (repairing a damaged file's layout; the
    damaged rows are then re-extracted by the caller). A full disk is a DiskFullError naming the file."""
    header = npy_header(shape)
    size = len(header) + shape[0] * row_bytes(shape)
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
    return map_array(path, shape, "r+")


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


def map_array(path: Path, shape: tuple[int, ...], mode: str) -> np.memmap:
    """The rows of an existing .npy file of `shape` written by this module (its header already checked)."""
    return np.memmap(path, dtype=DTYPE, mode=mode, offset=len(npy_header(shape)), shape=shape)


def digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows)).hexdigest()


def _file_digest(f, offset: int, size: int) -> str:
    f.seek(offset)
    return hashlib.sha256(f.read(size)).hexdigest()


def chunk_ranges(n: int, chunk_rows: int, chunks: Sequence[int] | None = None) -> list[tuple[int, int]]:
    indices = range(math.ceil(n / chunk_rows)) if chunks is None else chunks
    return [(c * chunk_rows, min(n, (c + 1) * chunk_rows)) for c in indices]


def check_arrays(path: Path, manifest: dict) -> tuple[list[str], list[int]]:
    """(problems, damaged chunk indices) of a finished entry; ([], []) when it matches its manifest.

    Sizes and headers are always checked; checksums only for files that changed since they last verified.
    """
    n, chunk_rows = len(manifest["keys"]), manifest["chunk_rows"]
    all_chunks = list(range(math.ceil(n / chunk_rows)))
    stamp = read_json(path / STAMP) or {}
    new_stamp: dict[str, list[int]] = {}
    problems: list[str] = []
    damaged: set[int] = set()
    for name, shape in manifest_shapes(manifest).items():
        file = path / name
        header, size_of_row = npy_header(shape), row_bytes(shape)
        expected = len(header) + n * size_of_row
        try:
            st = file.stat()
            with open(file, "rb") as f:
                head = f.read(len(header))
        except OSError as e:
            problems.append(f"{file} cannot be read ({type(e).__name__}: {e})")
            damaged.update(all_chunks)
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
        if head != header:
            bad = all_chunks  # rows behind a foreign header cannot be trusted (nor located): all come back
        else:
            with open(file, "rb") as f:  # a chunk past the end of a truncated file reads short and fails
                bad = [c for c, (a, b) in enumerate(chunk_ranges(n, chunk_rows))
                       if _file_digest(f, len(header) + a * size_of_row, (b - a) * size_of_row)
                       != manifest["chunks"][name][c]]
        if bad and head == header:
            rows = ", ".join(f"{a}-{b - 1}" for a, b in chunk_ranges(n, chunk_rows, bad))
            problems.append(f"{file} rows {rows} fail their checksum")
        damaged.update(bad)
        if intact and not bad:
            new_stamp[name] = signature + [time.time_ns()]
    if not problems and new_stamp != stamp:
        try:
            atomic_write_text(path / STAMP, json.dumps(new_stamp))
        except OSError:  # a read-only cache (shared disk): it is simply verified again next time
            pass
    return problems, sorted(damaged)


# --- source images: fingerprints, and which changed since they were encoded -----------------------------------------

def source_fingerprint(path: Path, content: list[bytes] | None = None) -> list | None:
    """[size, mtime_ns, ctime_ns, inode, taken_ns, sha256 (first 128 bits, hex)] of an image file as it is now, or
    None when it cannot be read. The stat comes from the descriptor that is hashed, before the bytes are read: a
    file changed while being hashed differs from its fingerprint later, so it is looked at again. `content`: a list
    that gets the bytes hashed, block by block (for a reader that needs them: the file is then read once)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a pipe named like an image must not hang
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        taken, hashed = time.time_ns(), hashlib.sha256()
        try:
            while block := f.read(1 << 20):
                hashed.update(block)
                if content is not None:
                    content.append(block)
        except OSError:
            return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, taken, hashed.hexdigest()[:32]]


def read_sources(path: Path, n: int) -> list | None:
    """The fingerprint of each row's image (None for an image that could not be read), or None when the entry's
    sources.json is missing or damaged."""
    data = read_json(path / SOURCES)
    rows = data.get("rows") if data else None
    if not isinstance(rows, list) or len(rows) != n:
        return None
    if not all(r is None or (isinstance(r, list) and len(r) == 6) for r in rows):
        return None
    return rows


def read_chunk_sources(partial: Path, chunk: int, rows: int) -> list | None:
    """The fingerprints a chunk of an extraction in progress recorded when it was encoded, or None."""
    try:
        data = json.loads((partial / f"sources.{chunk}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, list) and len(data) == rows else None


def write_sources(path: Path, rows: list) -> None:
    atomic_write_text(path / SOURCES, json.dumps({"fields": ["size", "mtime_ns", "ctime_ns", "inode", "taken_ns",
                                                             "sha256_128"], "rows": rows}))


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


def changed_images(sources: list, records: Sequence[CaptionRecord]) -> tuple[list[int], list, bool]:
    """(rows whose image's bytes changed since they were encoded, the fingerprints as they are now, whether any
    fingerprint is new), given the entry's recorded `sources`. One stat an image; only images whose stat differs
    are hashed again."""
    current = list(sources)
    changed, renewed = [], False
    for i, record in enumerate(records):
        if _stat_unchanged(sources[i], record.image):
            continue
        new = source_fingerprint(record.image)
        if not _same_content(sources[i], new):
            changed.append(i)
        renewed = renewed or new != current[i]
        current[i] = new
    return changed, current, renewed
