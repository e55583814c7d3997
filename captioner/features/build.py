"""Building a cache entry: plan, resume, repair, refresh changed images, lock, and share the work among DDP ranks.

Guarantees (tests/test_reliability.py has a test for each):
- Unreadable images (missing, empty, truncated, corrupt, not an image) never stop an extraction: their rows are
  zeros, `manifest["failed"]` / `FeatureCache.failed` name each with the reason, and a warning lists them.
- `kill -9` at any moment loses at most the chunk being written. Rows are flushed (msync) before a progress file
  records them with their checksums, and progress files are replaced atomically. The next run re-checks the recorded
  chunks, encodes only the rest, with the recorded batch and chunk sizes, so the result is byte-identical to an
  uninterrupted extraction. Only a finished extraction is renamed to `<key>/`: a half-written cache never looks
  complete. `<key>.partial/` holds the arrays, plan.json (batch/chunk sizes, chunks verified as done when it
  started), progress.<rank>.json (the chunks each process has done since) and sources.<chunk>.json (the
  fingerprints of each done chunk's images).
- Damage found when an entry is opened (captioner.features.cache) is repaired: only the damaged chunks are
  re-extracted; an entry whose manifest or sources.json is unreadable is rebuilt.
- A cached feature never outlives a change of its source image: an image whose bytes differ from its fingerprint
  (replaced, edited, deleted, made readable after failing) has its row re-extracted, alone; the log names them. An
  image that is only touched keeps its features.
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

import contextlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..config import resolve_decode
from ..data.records import CaptionRecord
from ..encoders import EncoderSpec, FrozenEncoder, spec_transform, transform_signature
from ..errors import NO_PERMISSION, NO_SPACE, UserError, disk_full
from ..files import atomic_write_text, fsync_dir
from .cache import (FORMAT_VERSION, CacheDamagedError, FeatureCache, cache_key, changed_images, chunk_ranges,
                    digest, manifest_shapes, map_array, not_writable, npy_header, open_array, read_chunk_sources,
                    read_json, read_manifest, read_sources, row_bytes, shapes_of, write_sources)
from .extract import decode_path, encode_batches, encode_ranges, flush

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent builds of one cache are then not prevented
    fcntl = None

log = logging.getLogger(__name__)


def prepare_features(
    records_by_split: dict[str, Sequence[CaptionRecord]],
    spec: EncoderSpec,
    cache_dir: str | Path,
    dataset_id: str,
    spatial: bool = False,
    decode: str = "pil",
    **extract_kwargs,
) -> dict[str, FeatureCache]:
    """Open (or build) the cache of every split; the encoder is only built when some split must be encoded.
    `decode`: auto | pil | device (`features.decode`: how images are decoded, captioner.features.extract).
    `extract_kwargs`: batch_size, num_workers, flush_every, progress, device, and `group` (an ExtractionGroup: every
    rank of a DDP job calls this, and each encodes its share of a cache that has to be built)."""
    transform = spec_transform(spec)
    sig = transform_signature(transform)
    decode = decode_path(transform, resolve_decode(decode, extract_kwargs.get("device", "cpu")))
    encoder: FrozenEncoder | None = None

    def get_encoder() -> FrozenEncoder:
        nonlocal encoder
        encoder = encoder or FrozenEncoder(spec)
        return encoder

    out: dict[str, FeatureCache] = {}
    for split, records in records_by_split.items():
        key = cache_key(dataset_id, split, [r.key for r in records], spec, sig, spatial, decode)
        out[split] = _open_or_build(Path(cache_dir), key, records, get_encoder, f"{dataset_id}/{split}",
                                    spatial=spatial, decode=decode, **extract_kwargs)
    return out


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
    decode: str = "pil",
) -> FeatureCache:
    """`prepare_features` for one split with an encoder at hand: the cache for these records, extracted (or
    resumed, or repaired) if needed.

    `flush_every` batches make one chunk: the unit of progress after a kill and of repair after damage.
    """
    transform = encoder.transform()
    decode = decode_path(transform, resolve_decode(decode, device))
    key = cache_key(dataset_id, split, [r.key for r in records], encoder.spec, transform_signature(transform),
                    spatial, decode)
    return _open_or_build(Path(cache_dir), key, records, lambda: encoder, f"{dataset_id}/{split}", spatial=spatial,
                          batch_size=batch_size, num_workers=num_workers, flush_every=flush_every,
                          progress=progress, device=device, group=group, decode=decode)


def _open_or_build(cache_dir: Path, key: str, records: Sequence[CaptionRecord],
                   get_encoder: Callable[[], FrozenEncoder], label: str, spatial: bool = False, batch_size: int = 8,
                   num_workers: int = 2, flush_every: int = 32, progress: bool = True,
                   device: str | torch.device = "cpu", group: ExtractionGroup = SOLO,
                   decode: str = "pil") -> FeatureCache:
    """The verified cache `<cache_dir>/<key>` of these records, built, resumed or repaired as needed. Rank 0 holds
    the entry's lock throughout (other jobs wait) and decides; a build is shared by every rank of `group`, a repair
    (a few damaged chunks) is rank 0's alone. `get_encoder` is only called when something has to be encoded.
    `decode` (pil | device, keyed in `key`) is the decode path of every row written, resumed or repaired."""
    final = cache_dir / key
    try:
        if group.rank == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
        lock = _exclusive_lock(cache_dir / f"{key}.lock", label) if group.rank == 0 else contextlib.nullcontext()
        with lock:
            ready = group.broadcast(_open_or_repair(final, records, get_encoder, label, num_workers, progress,
                                                    device, decode) if group.rank == 0 else None)
            if not ready:
                if group.rank == 0:
                    _check_writable(cache_dir)  # before the encoder is built (or downloaded) for nothing
                _build(final, records, get_encoder(), label, spatial, batch_size, num_workers, flush_every,
                       progress, device, group, decode)
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


def _warn_failed(cache: FeatureCache, label: str) -> None:
    if cache.failed:
        log.warning("%d image(s) of %s could not be read and are left out: %s%s. Fix or remove them; a fixed "
                    "image is extracted again by the next run.", len(cache.failed), label,
                    "; ".join(list(cache.failed.values())[:5]), " ..." if len(cache.failed) > 5 else "")


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


# --- a finished entry: open, repair, refresh ------------------------------------------------------------------------

def _open_or_repair(final: Path, records: Sequence[CaptionRecord], get_encoder: Callable[[], FrozenEncoder],
                    label: str, num_workers: int, progress: bool, device, decode: str = "pil") -> bool:
    """True when `final` holds a verified cache of these records (repairing damaged chunks and re-extracting
    changed images first); False when it must be built (absent, or damaged beyond repair: then it is removed)."""
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
        if read_sources(final, len(records)) is None:  # without fingerprints no row can be vouched for
            raise CacheDamagedError(final, [f"{final / 'sources.json'} is missing or unreadable"], None)
    except CacheDamagedError as e:
        log.warning("%s", e)
        if e.chunks is None:
            _remove_entry(final)
            return False
        _repair(final, e.chunks, records, get_encoder(), label, num_workers, progress, device, decode)
        FeatureCache.open(final)  # verified again: damage that persists is an error
    _refresh_changed_images(final, records, get_encoder, label, num_workers, progress, device, decode)
    return True


def _repair(path: Path, chunks: list[int], records: Sequence[CaptionRecord], encoder: FrozenEncoder, label: str,
            num_workers: int, progress: bool, device, decode: str = "pil") -> None:
    """Re-extract the rows of the damaged `chunks` in place, with the original batch size."""
    from tqdm.auto import tqdm

    manifest = read_manifest(path)
    n, chunk_rows = len(records), manifest["chunk_rows"]
    ranges = chunk_ranges(n, chunk_rows, chunks)
    log.warning("feature cache of %s: re-extracting %d of %d images (damaged rows) in %s", label,
                sum(b - a for a, b in ranges), n, path)
    arrays = {name: open_array(path / name, shape, create=False)
              for name, shape in manifest_shapes(manifest).items()}
    redone = {records[i].key for a, b in ranges for i in range(a, b)}
    failed = {k: v for k, v in manifest["failed"].items() if k not in redone}
    sources = read_sources(path, n)
    changed = []

    def chunk_done(a: int, b: int, chunk_failed: dict[str, str], fingerprints: list) -> None:
        flush(arrays)
        c = a // chunk_rows
        for name, array in arrays.items():
            now = digest(array[a:b])
            if now != manifest["chunks"][name][c]:
                changed.append(f"{name} rows {a}-{b - 1}")
                manifest["chunks"][name][c] = now
        failed.update(chunk_failed)
        sources[a:b] = fingerprints

    encoder = encoder.to(device)
    bar = tqdm(total=len(redone), desc=f"repair {label}", unit="img", disable=not progress)
    encode_ranges(encoder, records, ranges, arrays, manifest["batch_size"], num_workers, device, chunk_done, bar,
                  decode)
    bar.close()
    arrays.clear()
    if changed:
        log.warning("re-extracted %s differ bit-wise from the original extraction (another torch version or "
                    "device?); the manifest now records their new checksums", ", ".join(changed[:5]))
    manifest["failed"] = {r.key: failed[r.key] for r in records if r.key in failed}
    atomic_write_text(path / "manifest.json", json.dumps(manifest))
    write_sources(path, sources)


def _refresh_changed_images(path: Path, records: Sequence[CaptionRecord], get_encoder: Callable[[], FrozenEncoder],
                            label: str, num_workers: int, progress: bool, device, decode: str = "pil") -> None:
    """Re-extract the rows whose image changed since it was encoded (only those) and record the fingerprints."""
    manifest = read_manifest(path)
    changed, current, renewed = changed_images(read_sources(path, len(records)), records)
    if changed:
        names = ", ".join(records[i].key for i in changed[:5]) + (" ..." if len(changed) > 5 else "")
        log.warning("feature cache of %s: %d of %d image(s) changed since their features were extracted (%s): "
                    "re-extracting those only", label, len(changed), len(records), names)
        _reextract_rows(path, manifest, changed, current, records, get_encoder(), label, num_workers, progress,
                        device, decode)
    elif renewed:
        try:  # touched or copied back: same bytes, so the features stand
            write_sources(path, current)
        except OSError as e:  # a read-only cache: the images are hashed again next time, nothing is stale
            log.info("cannot record image fingerprints in %s (%s): they are hashed again on every open", path, e)


def _reextract_rows(path: Path, manifest: dict, rows: list[int], sources: list, records: Sequence[CaptionRecord],
                    encoder: FrozenEncoder, label: str, num_workers: int, progress: bool, device,
                    decode: str = "pil") -> None:
    """Encode `rows` again in place, then record their chunks' checksums, the unreadable images and the
    fingerprints (in this order: a kill in between leaves checksums that fail, or fingerprints that differ, and
    the next run redoes the rows)."""
    from tqdm.auto import tqdm

    shapes = manifest_shapes(manifest)
    arrays = {name: open_array(path / name, shape, create=False) for name, shape in shapes.items()}
    redone = {records[i].key for i in rows}
    failed = {k: v for k, v in manifest["failed"].items() if k not in redone}
    bar = tqdm(total=len(rows), desc=f"changed images {label}", unit="img", disable=not progress)
    for batch, batch_failed, fingerprints in encode_batches(encoder.to(device), records, rows, arrays,
                                                            manifest["batch_size"], num_workers, device, bar,
                                                            decode):
        failed.update(batch_failed)
        for row, fingerprint in zip(batch, fingerprints):
            sources[row] = fingerprint
    bar.close()
    flush(arrays)
    chunk_rows = manifest["chunk_rows"]
    for a, b in chunk_ranges(len(records), chunk_rows, sorted({row // chunk_rows for row in rows})):
        for name, array in arrays.items():
            manifest["chunks"][name][a // chunk_rows] = digest(array[a:b])
    arrays.clear()
    manifest["failed"] = {r.key: failed[r.key] for r in records if r.key in failed}
    atomic_write_text(path / "manifest.json", json.dumps(manifest))
    write_sources(path, sources)


# --- a new entry: plan, encode (resuming, shared among ranks), finalise ---------------------------------------------

def _recorded_chunks(partial: Path) -> dict[int, dict]:
    """Chunks an interrupted extraction recorded as done, from plan.json and every rank's progress file:
    {chunk: {"digests": {array: sha256}, "failed": {key: reason}}}."""
    plan = read_json(partial / "plan.json") or {}
    recorded = {int(c): v for c, v in plan.get("done", {}).items()}
    for f in sorted(partial.glob("progress.*.json")):
        recorded.update({int(c): v for c, v in (read_json(f) or {}).get("chunks", {}).items()})
    return recorded


def _plan(partial: Path, n: int, shapes: dict[str, tuple[int, ...]], batch_size: int, flush_every: int,
          label: str) -> dict:
    """Rank 0: create `<key>.partial/` or take over an interrupted one, and write plan.json: the batch and chunk
    sizes (an interrupted run's, so that its rows stay byte-identical) and the recorded chunks whose rows still
    match their checksums and whose images' fingerprints are there. Every other chunk is left to encode."""
    if _is_or_holds_link(partial):  # written only by this module, as plain files: a link is damage
        log.warning("%s is or holds a symbolic link: removed (the links only) and extracted again", partial)
        _remove_entry(partial)
    plan = read_json(partial / "plan.json")
    usable = (plan is not None and plan.get("n") == n and plan.get("shapes") == {k: list(v) for k, v in shapes.items()}
              and isinstance(plan.get("batch_size"), int) and isinstance(plan.get("chunk_rows"), int))
    for name, shape in shapes.items():
        header = npy_header(shape)
        try:
            with open(partial / name, "rb") as f:
                usable = usable and f.read(len(header)) == header
            usable = usable and (partial / name).stat().st_size == len(header) + shape[0] * row_bytes(shape)
        except OSError:
            usable = False
    done: dict[int, dict] = {}
    if usable:
        recorded = _recorded_chunks(partial)
        arrays = {name: map_array(partial / name, shape, "r") for name, shape in shapes.items()}
        ranges = chunk_ranges(n, plan["chunk_rows"])
        done = {c: v for c, v in recorded.items() if c < len(ranges) and set(v["digests"]) == set(shapes)
                and all(digest(arrays[name][slice(*ranges[c])]) == v["digests"][name] for name in shapes)
                and read_chunk_sources(partial, c, ranges[c][1] - ranges[c][0]) is not None}
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
                open_array(partial / name, shape, create=True)
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
           group: ExtractionGroup = SOLO, decode: str = "pil") -> None:
    """Extract into `<key>.partial/` (resuming it when possible) and rename it to `<key>/` when complete.

    With a group of several processes, each encodes every world-th chunk still to do into the shared arrays and
    records it in its own progress.<rank>.json; rank 0 then checks that every chunk is there and finalises. The
    batches are those of a one-process extraction (chunks are whole batches), so are the bytes.
    """
    from tqdm.auto import tqdm

    partial = final.with_name(final.name + ".partial")
    n = len(records)
    shapes = shapes_of(n, encoder.dim, encoder.num_tokens, spatial)
    plan = group.broadcast(_plan(partial, n, shapes, batch_size, flush_every, label) if group.rank == 0 else None)
    ranges = chunk_ranges(n, plan["chunk_rows"])
    mine = [c for c in range(len(ranges)) if str(c) not in plan["done"]][group.rank::group.world]
    arrays = {name: map_array(partial / name, shape, "r+") for name, shape in shapes.items()}
    progress_file = partial / f"progress.{group.rank}.json"
    recorded: dict[str, dict] = {}

    def chunk_done(a: int, b: int, failed: dict[str, str], fingerprints: list) -> None:
        flush(arrays)
        chunk = a // plan["chunk_rows"]
        # its own file, written once: in the progress file, rewritten after every chunk, they would cost O(n^2)
        atomic_write_text(partial / f"sources.{chunk}.json", json.dumps(fingerprints))
        recorded[str(chunk)] = {
            "digests": {name: digest(array[a:b]) for name, array in arrays.items()}, "failed": failed}
        atomic_write_text(progress_file, json.dumps({"chunks": recorded}))

    if group.world > 1:
        log.info("rank %d of %d extracts %d of the %d chunks of %s still to do", group.rank, group.world,
                 len(mine), len(ranges) - len(plan["done"]), label)
    encoder = encoder.to(device)
    todo = [ranges[c] for c in mine]
    bar = tqdm(total=sum(b - a for a, b in todo), desc=f"features {label}", unit="img",
               disable=not progress or group.rank != 0, smoothing=0.1)
    encode_ranges(encoder, records, todo, arrays, plan["batch_size"], num_workers, device, chunk_done, bar, decode)
    bar.close()
    arrays.clear()  # unmap before the rename
    group.barrier()  # every rank's chunks are on disk and recorded

    if group.rank == 0:
        done = _recorded_chunks(partial)
        sources = {c: read_chunk_sources(partial, c, b - a) for c, (a, b) in enumerate(ranges)}
        missing = [c for c in range(len(ranges)) if c not in done or sources[c] is None]
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
        write_sources(partial, [row for c in range(len(ranges)) for row in sources[c]])
        atomic_write_text(partial / "manifest.json", json.dumps(manifest))
        # A kill between these lines leaves a complete .partial/ with its progress: the next run only renames it.
        os.replace(partial, final)
        fsync_dir(final.parent)
        for f in [final / "plan.json", *final.glob("progress.*.json"), *final.glob("sources.*.json")]:
            f.unlink(missing_ok=True)
    group.barrier()  # the other ranks open `final` only after the rename
