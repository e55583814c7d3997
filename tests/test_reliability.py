"""Reliability of the data side: bad images, messy caption files, and a feature cache that survives kill -9,
damage on disk and concurrent builders.

Each test names the protection it checks; each fails when that protection is taken out. The crash and concurrency
tests run real subprocesses: this file doubles as their worker script (see `_worker` at the bottom).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import counting

from captioner import images
from captioner.data.formats import SKIP_HINTS, read_csv, read_flickr8k, read_flickr8k_csv, read_flickr30k
from captioner.data import formats as F
from captioner.data.records import CaptionRecord
from captioner.files import atomic_write_text
from captioner.features import SOLO, CacheDamagedError, ExtractionGroup, FeatureCache, extract_features
from captioner.features.build import _recorded_chunks
from captioner.images import ImageReadError, load_image

BATCH, FLUSH_EVERY = 4, 2  # chunks of 8 rows: the 40 images below make 5 chunks
WORKER_TIMEOUT = 120


# --- helpers ------------------------------------------------------------------------------------------------------

def digests(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in ("global.npy", "spatial.npy")}


def record(path: Path, key: str | None = None) -> CaptionRecord:
    return CaptionRecord(image=path, captions=["a picture ."], split="test", key=key or path.name)


def extract(encoder, records, cache_dir: Path, **kwargs) -> FeatureCache:
    """The extraction every cache test uses: 4-image batches, 8-row chunks, spatial tokens, no worker processes."""
    options = dict(spatial=True, batch_size=BATCH, flush_every=FLUSH_EVERY, num_workers=0, progress=False)
    return extract_features(encoder, records, cache_dir, "d", "train", **{**options, **kwargs})


@pytest.fixture(scope="module")
def clip(tiny_shapes):
    """40 small shapes images."""
    return tiny_shapes.split("train")[:40]


@pytest.fixture(scope="module")
def reference(clip, lite0, tmp_path_factory):
    """An uninterrupted extraction of `clip`: its cache folder and the sha256 of its arrays."""
    cache = extract(lite0, clip, tmp_path_factory.mktemp("reference"))
    return cache.path, digests(cache.path)


def copy_reference(reference, tmp_path: Path) -> Path:
    """A copy of the reference cache under tmp_path/cache, at the same key (so extraction finds it)."""
    path = tmp_path / "cache" / reference[0].name
    shutil.copytree(reference[0], path)
    return path


def run_workers(tmp_path: Path, configs: list[dict]) -> list[subprocess.CompletedProcess]:
    """Start one worker process per config at once; wait for all."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = []
    for i, cfg in enumerate(configs):
        cfg = {"threads": torch.get_num_threads(), "batch_size": BATCH, "flush_every": FLUSH_EVERY, **cfg}
        path = tmp_path / f"worker{i}.json"
        path.write_text(json.dumps(cfg))
        procs.append(subprocess.Popen([sys.executable, __file__, str(path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=WORKER_TIMEOUT)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def encoded(count_file: Path) -> int:
    """Images the workers ran the encoder on (one line per batch: its size)."""
    return sum(int(line) for line in count_file.read_text().split()) if count_file.exists() else 0


# --- 1. bad images at feature extraction: skipped and counted, the run goes on ------------------------------------

def _truncated(path: Path, jpeg: bytes) -> None:
    path.write_bytes(jpeg[: len(jpeg) // 2])


def _corrupt(path: Path, jpeg: bytes) -> None:
    damaged = bytearray(jpeg)
    damaged[2:64] = bytes(62)  # the JPEG markers after SOI: no decoder can make sense of the rest
    path.write_bytes(bytes(damaged))


BAD_IMAGES = {  # kind -> (how to make it from a good JPEG's bytes, what the message must say)
    "truncated_jpeg": (_truncated, "truncated"),
    "corrupt_jpeg": (_corrupt, "cannot identify image file"),
    "zero_byte_file": (lambda path, jpeg: path.write_bytes(b""), "empty file (0 bytes)"),
    "missing_image": (lambda path, jpeg: None, "file not found"),
    "text_named_jpg": (lambda path, jpeg: path.write_text("caption,of,a,dog\nnot an image\n"),
                       "cannot identify image file"),
}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_image_is_skipped_counted_and_named(kind, tiny_shapes, lite0, tmp_path, caplog):
    """Protection: load_image turns every read failure into ImageReadError and extraction zeroes + lists the row."""
    make, reason = BAD_IMAGES[kind]
    good = tiny_shapes.split("test")[:2]
    bad_path = tmp_path / f"{kind}.jpg"
    make(bad_path, good[0].image.read_bytes())
    bad = record(bad_path, key=f"broken/{kind}.jpg")
    with caplog.at_level(logging.WARNING, logger="captioner.features"):
        cache = extract(lite0, [good[0], bad, good[1]], tmp_path / "cache", spatial=False)
    assert list(cache.failed) == [bad.key]
    assert str(bad_path) in cache.failed[bad.key] and reason in cache.failed[bad.key]
    assert cache.valid_rows().tolist() == [True, False, True]
    assert not cache.pooled[1].any() and cache.pooled[0].any() and cache.pooled[2].any()
    # the run's summary names the file and what to do
    assert "1 image(s) of d/train could not be read" in caplog.text and str(bad_path) in caplog.text
    assert "Fix or remove them" in caplog.text


def test_png_with_alpha_is_used_on_white(lite0, tmp_path):
    """Protection: to_rgb composites transparency on white (a plain convert("RGB") gives black)."""
    drawing = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent pixels stored as black
    drawing.paste((200, 30, 30, 255), (16, 16, 48, 48))
    drawing.save(tmp_path / "alpha.png")
    on_white = Image.new("RGB", (64, 64), (255, 255, 255))
    on_white.paste((200, 30, 30), (16, 16, 48, 48))
    on_white.save(tmp_path / "white.png")

    assert np.array_equal(np.asarray(load_image(tmp_path / "alpha.png")), np.asarray(on_white))
    cache = extract(lite0, [record(tmp_path / "alpha.png"), record(tmp_path / "white.png")], tmp_path / "cache",
                    spatial=False)
    assert cache.failed == {}
    np.testing.assert_allclose(cache.pooled[0], cache.pooled[1], atol=1e-3)


def test_1x1_image_is_used(lite0, tmp_path):
    """Protection: no minimum size; the encoder's transform resizes a 1x1 image like any other."""
    Image.new("RGB", (1, 1), (40, 120, 200)).save(tmp_path / "dot.png")
    cache = extract(lite0, [record(tmp_path / "dot.png")], tmp_path / "cache", spatial=False)
    assert cache.failed == {} and cache.valid_rows().tolist() == [True]
    assert np.isfinite(cache.pooled[0].astype(np.float32)).all() and cache.pooled[0].any()


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A 10000x10000 solid grey PNG (100 MP, over PIL's default bomb limit), cheap to write and to decode."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("L", (10_000, 10_000), 128).save(path, compress_level=1)
    return path


def test_10000x10000_image_is_used(huge_png, lite0, tmp_path):
    """Protection: MAX_PIXELS admits 100 MP photos; the huge image gives the same features as a small one of the
    same content (so the shrinking while decoding loses nothing the encoder sees)."""
    Image.new("L", (100, 100), 128).save(tmp_path / "small.png")
    im = load_image(huge_png)
    assert im.mode == "RGB" and max(im.size) <= images.MAX_DECODE_SIDE
    cache = extract(lite0, [record(huge_png), record(tmp_path / "small.png")], tmp_path / "cache", spatial=False)
    assert cache.failed == {}
    np.testing.assert_allclose(cache.pooled[0], cache.pooled[1], atol=1e-3)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_decoding_a_huge_image_keeps_memory_bounded(huge_png):
    """Protection: big images are shrunk right after decoding, before the RGB conversion copies them (without it
    the 100 MB greyscale decode peaks at ~590 MB; with it ~165 MB)."""
    # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak over a fork + exec into ru_maxrss.
    code = ("import re, sys\nfrom captioner.images import load_image\nload_image(sys.argv[1])\n"
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(huge_png)], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 300, f"peak memory {out.stdout.strip()} MiB decoding a 10000x10000 PNG"


def test_image_over_max_pixels_is_refused_before_decoding(monkeypatch, tmp_path):
    """Protection: our own exact pixel limit (PIL alone only refuses at twice its limit, and only warns below)."""
    Image.new("RGB", (150, 150)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    with pytest.raises(ImageReadError, match="150x150 pixels is over the 10,000-pixel limit") as err:
        load_image(tmp_path / "bomb.png")
    assert str(tmp_path / "bomb.png") in str(err.value) and "downscale" in str(err.value)


# --- 2. caption files: every problem reported with file:line and what to do, never a crash -------------------------

A, B = "1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"


def write(path: Path, lines: list) -> None:
    """Lines as UTF-8; a bytes line is written verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))


def make_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (90, 80, 160)).save(folder / name)


def test_skip_summary_names_file_line_and_what_to_do(tmp_path):
    """Protection: every skip reason is counted with its first file:line, and the summary says what to do."""
    root = tmp_path / "flickr8k"
    write(root / "Flickr8k.token.txt", [
        f"{A}#0\tA girl going into a wooden building .",                    # 1
        f"{A}#1\tA girl going into a wooden building .",                    # 2 duplicate
        f"{A}#2\tA little girl in the caf\xe9 .".encode("latin-1"),         # 3 non-UTF-8 byte: kept, reported
        f"{A}#3\t",                                                         # 4 empty caption
        f"{A}#4\t. . . !",                                                  # 5 only punctuation
        f"{B}#0\tTwo dogs\ton the road .",                                  # 6 wrong number of fields
        f"{B}#1\tTwo dogs on pavement moving toward each other .",          # 7
        "2258277193_586949ec62.jpg#0\tA boy on a bench .",                  # 8 image missing
        "../../etc/passwd#0\tA secret .",                                   # 9 escapes the root
    ])
    write(root / "Flickr_8k.trainImages.txt", [A, B, "../../etc/passwd"])
    write(root / "Flickr_8k.devImages.txt", ["9999999999_0000000000.jpg"])   # names an image that is not there
    write(root / "Flickr_8k.testImages.txt", [])
    make_images(root / "Flicker8k_Dataset", [A, B])

    ds = read_flickr8k(root)
    # the rest is loaded
    assert {r.key: r.captions for r in ds.records} == {
        f"Flicker8k_Dataset/{A}": ["A girl going into a wooden building .", "A little girl in the caf\ufffd ."],
        f"Flicker8k_Dataset/{B}": ["Two dogs on pavement moving toward each other ."]}
    expected = {
        F.DUPLICATE_CAPTION: "Flickr8k.token.txt:2", F.BAD_BYTES: "Flickr8k.token.txt:3",
        F.EMPTY_CAPTION: "Flickr8k.token.txt:4", F.NO_ALNUM_CAPTION: "Flickr8k.token.txt:5",
        F.WRONG_FIELDS: "Flickr8k.token.txt:6", F.MISSING_IMAGE: "Flickr8k.token.txt:8",
        F.ESCAPES_ROOT: "Flickr8k.token.txt:9, Flickr_8k.trainImages.txt:3",
        F.LISTED_WITHOUT_CAPTIONS: "Flickr_8k.devImages.txt:1",
    }
    summary = ds.skipped.summary().splitlines()
    for reason, where in expected.items():
        line = next(x for x in summary if x.strip().startswith(f"- {reason}:"))
        assert f"(first at: {where})" in line and line.endswith(f" -> {SKIP_HINTS[reason]}"), line


def test_paths_in_caption_and_split_files_cannot_escape_the_root(tmp_path):
    """Protection: _relative_key refuses names that leave the root, relative (../) or absolute, even when the
    file they point at exists and is a readable image."""
    root = tmp_path / "dataset"
    make_images(tmp_path, ["secret.jpg"])  # outside the root
    make_images(root / "images", ["cat.jpg"])
    write(root / "captions.csv", ["image,caption", "cat.jpg,A cat on a sofa .", "../../secret.jpg,A secret .",
                                  f"{tmp_path / 'secret.jpg'},An absolute secret ."])
    ds = read_csv(root)
    assert [r.key for r in ds.records] == ["images/cat.jpg"]
    assert ds.skipped.examples[F.ESCAPES_ROOT] == ["captions.csv:3", "captions.csv:4"]
    assert "path escapes dataset root: 2 (first at: captions.csv:3, captions.csv:4) -> image names must be " \
           "relative paths inside the dataset root" in ds.skipped.summary()


def test_garbage_bytes_in_caption_files_never_crash_a_reader(tmp_path):
    """Protection: lines are decoded one by one with replacement and parsed one by one, so random bytes (NUL,
    stray quotes, invalid UTF-8, lone CR) only cost their own lines; the good lines around them are loaded."""
    rng = random.Random(0)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))).replace(b"\n", b"") for _ in range(60)]
    good = {A: "A girl going into a wooden building .", B: "Two dogs on pavement moving toward each other ."}

    def mixed(good_lines: list[str], header: list[str] = ()) -> list:
        # a good first line (Flickr30k tells its three layouts apart by it), then garbage around the other one
        return [*header, good_lines[0], *garbage[:30], good_lines[1], *garbage[30:]]

    token_lines = [f"{name}#0\t{caption}" for name, caption in good.items()]
    cases = {
        "flickr8k": (read_flickr8k, "Flickr8k.token.txt", "Flicker8k_Dataset", mixed(token_lines)),
        "flickr8k_csv": (read_flickr8k_csv, "captions.txt", "Images",
                         mixed([f"{n},{c}" for n, c in good.items()], ["image,caption"])),
        "flickr30k": (read_flickr30k, "results_20130124.token", "flickr30k_images", mixed(token_lines)),
        "csv": (read_csv, "captions.csv", "images", mixed([f"{n},{c}" for n, c in good.items()], ["image,caption"])),
        "jsonl": (lambda root: read_csv(root, file="captions.jsonl"), "captions.jsonl", "images",
                  mixed([json.dumps({"image": n, "caption": c}) for n, c in good.items()])),
    }
    for name, (reader, caption_file, images_dir, lines) in cases.items():
        root = tmp_path / name
        write(root / caption_file, lines)
        if name == "flickr8k":
            write(root / "Flickr_8k.trainImages.txt", list(good))
            write(root / "Flickr_8k.devImages.txt", [])
            write(root / "Flickr_8k.testImages.txt", [])
        make_images(root / images_dir, list(good))
        ds = reader(root)
        assert {r.key: r.captions for r in ds.records} == {f"{images_dir}/{n}": [c] for n, c in good.items()}, name
        assert ds.skipped.total >= len(garbage) // 2, name


# --- 3. kill -9 during extraction: resume, nothing recomputed, byte-identical --------------------------------------

@pytest.mark.e2e
def test_kill_9_mid_extraction_resumes_without_recomputing_and_is_byte_identical(clip, reference, lite0,
                                                                                 tmp_path):
    """Protection: rows are flushed before progress.json (atomically replaced) records them with checksums; a
    resumed run trusts only recorded, matching chunks and uses the recorded batch size."""
    cache_dir, count_file = tmp_path / "cache", tmp_path / "encoded.txt"
    # Killed at the start of its 6th batch: chunks 0-1 (rows 0-15) are recorded, batch 5 (rows 16-19) is written
    # to the array but not recorded, the rest is untouched.
    [killed] = run_workers(tmp_path, [{"records": [[r.key, str(r.image)] for r in clip], "cache_dir": str(cache_dir),
                                        "count_file": str(count_file), "kill_at_forward": 6}])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert encoded(count_file) == 20
    partial = cache_dir / f"{reference[0].name}.partial"
    assert sorted(_recorded_chunks(partial)) == [0, 1]  # rows 0-15
    assert not (cache_dir / reference[0].name).exists()  # nothing looks complete

    with counting(lite0) as seen:
        resumed = extract(lite0, clip, cache_dir)
    assert sum(seen) == 24  # the 16 recorded images were not encoded again
    assert digests(resumed.path) == reference[1]
    assert not partial.exists() and not list(resumed.path.glob("p*.json"))  # no plan/progress left


def test_resume_re_encodes_a_recorded_chunk_whose_rows_were_lost(clip, reference, lite0, tmp_path):
    """Protection: on resume the recorded chunks are checked against their checksums, so rows that never reached
    the disk (or were damaged since) are encoded again instead of being trusted."""
    cache_dir = tmp_path / "cache"
    calls = {"n": 0}
    original = lite0.forward

    def dying(x):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(x)

    lite0.forward = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            extract(lite0, clip, cache_dir)
    finally:
        del lite0.forward
    partial = cache_dir / f"{reference[0].name}.partial"
    with open(partial / "global.npy", "r+b") as f:  # wipe a row of the recorded chunk 1 (rows 8-15)
        f.seek(128 + 10 * 1280 * 2)
        f.write(bytes(1280 * 2))
    with counting(lite0) as seen:
        resumed = extract(lite0, clip, cache_dir)
    assert sum(seen) == 32  # chunk 1 and everything after it
    assert digests(resumed.path) == reference[1]


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    """Protection: progress/manifest files are written to a temp file and renamed; a crash mid-write (here: the
    fsync fails) leaves the previous content, never a truncated JSON."""
    target = tmp_path / "progress.json"
    atomic_write_text(target, json.dumps({"done": 16}))

    def failing_fsync(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, json.dumps({"done": 24, "chunks": ["x" * 1000]}))
    assert json.loads(target.read_text()) == {"done": 16}
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temp file left behind


# --- 4. damage on disk: detected on open, only the damaged rows rebuilt ---------------------------------------------

def test_truncated_cache_file_is_detected_and_only_its_lost_rows_rebuilt(clip, reference, lite0, tmp_path):
    """Protection: the size of every array is checked on each open; chunks that no longer fit are re-extracted."""
    path = copy_reference(reference, tmp_path)
    spatial = path / "spatial.npy"
    os.truncate(spatial, spatial.stat().st_size - 1000)  # the last chunk (rows 32-39) loses its tail
    with pytest.raises(CacheDamagedError) as err:
        FeatureCache.open(path)
    msg = str(err.value)
    assert str(spatial) in msg and "expected" in msg and "truncated" in msg and "rows 32-39" in msg
    assert "delete" in msg  # says what to do
    with counting(lite0) as seen:
        repaired = extract(lite0, clip, tmp_path / "cache")
    assert sum(seen) == 8
    assert digests(repaired.path) == reference[1]


def test_corrupted_chunk_is_detected_and_only_its_rows_rebuilt(clip, reference, lite0, tmp_path):
    """Protection: per-chunk sha256 in the manifest, checked when the file changed since it last verified."""
    path = copy_reference(reference, tmp_path)
    with open(path / "global.npy", "r+b") as f:  # flip bytes inside row 12 (chunk 1: rows 8-15); size unchanged
        f.seek(128 + 12 * 1280 * 2 + 100)
        f.write(b"\xff" * 16)
    with pytest.raises(CacheDamagedError, match=r"global\.npy rows 8-15 fail their checksum"):
        FeatureCache.open(path)
    with counting(lite0) as seen:
        repaired = extract(lite0, clip, tmp_path / "cache")
    assert sum(seen) == 8
    assert digests(repaired.path) == reference[1]
    FeatureCache.open(repaired.path)  # verifies clean


def test_a_cache_file_replaced_by_a_link_is_never_written_through(clip, reference, lite0, tmp_path):
    """Security: a cache array swapped for a symbolic link to another file (here a truncated copy, which the repair
    used to open read-write and overwrite) is treated as damage: the entry is rebuilt, the link's target and the
    manifest's temp files untouched; and no cache write follows a planted link."""
    path = copy_reference(reference, tmp_path)
    victim = tmp_path / "victim.bin"
    victim.write_bytes((path / "spatial.npy").read_bytes()[:-1000])  # looks like a truncated cache array
    before = victim.read_bytes()
    (path / "spatial.npy").unlink()
    (path / "spatial.npy").symlink_to(victim)
    repaired = extract(lite0, clip, tmp_path / "cache")
    assert victim.read_bytes() == before
    assert not (repaired.path / "spatial.npy").is_symlink() and digests(repaired.path) == reference[1]
    planted = tmp_path / "planted.json"
    planted.write_text("keep")
    target = tmp_path / "manifest.json"
    (tmp_path / f".manifest.json.{os.getpid()}.tmp").symlink_to(planted)  # the temp name a writer will use
    atomic_write_text(target, "{}")
    assert planted.read_text() == "keep" and target.read_text() == "{}" and not target.is_symlink()
    target.unlink()
    target.symlink_to(planted)  # e.g. a run's metrics.json replaced by a link: replaced in turn, not followed
    atomic_write_text(target, "{}")
    assert planted.read_text() == "keep" and target.read_text() == "{}" and not target.is_symlink()


def test_unchanged_cache_is_not_rehashed_but_a_rewritten_one_is(reference, tmp_path, monkeypatch):
    """The cheap path: a file unchanged (size, mtime, inode) since a trusted verification is not hashed again."""
    import captioner.features.cache as features

    path = copy_reference(reference, tmp_path)
    old = time.time() - 3600
    for name in ("global.npy", "spatial.npy"):
        os.utime(path / name, (old, old))  # written an hour ago: a verification now can be trusted later
    FeatureCache.open(path)  # hashes and records the verification
    hashed = []
    original = features._file_digest
    monkeypatch.setattr(features, "_file_digest", lambda *a: (hashed.append(a), original(*a))[1])
    FeatureCache.open(path)
    assert hashed == []
    with open(path / "spatial.npy", "r+b") as f:  # any write changes mtime: checked (and caught) again
        f.seek(-10, os.SEEK_END)
        f.write(b"\x01" * 10)
    with pytest.raises(CacheDamagedError, match=r"spatial\.npy rows 32-39 fail their checksum"):
        FeatureCache.open(path)
    assert len(hashed) == 5  # the spatial file's 5 chunks; global.npy was still trusted


def test_unreadable_manifest_means_a_rebuild(clip, reference, lite0, tmp_path):
    path = copy_reference(reference, tmp_path)
    (path / "manifest.json").write_text('{"keys": [')
    with counting(lite0) as seen:
        rebuilt = extract(lite0, clip, tmp_path / "cache")
    assert sum(seen) == 40
    assert digests(rebuilt.path) == reference[1]


# --- 5. two processes building the same cache at once --------------------------------------------------------------

@pytest.mark.e2e
def test_two_processes_extracting_at_once_build_once_and_agree(clip, reference, tmp_path):
    """Protection: an flock on <key>.lock; the second process waits, says so, then opens the first one's cache."""
    cache_dir, count_file = tmp_path / "cache", tmp_path / "encoded.txt"
    common = {"records": [[r.key, str(r.image)] for r in clip], "cache_dir": str(cache_dir),
              "count_file": str(count_file), "forward_sleep": 0.05}
    ready = [str(tmp_path / "ready0"), str(tmp_path / "ready1")]
    results = run_workers(tmp_path, [{**common, "ready": ready[0], "wait_for": ready[1]},
                                     {**common, "ready": ready[1], "wait_for": ready[0]}])
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert encoded(count_file) == 40  # the encoder ran over the images once in total
    assert sum("waiting for another process building" in r.stderr for r in results) == 1
    paths = {json.loads(r.stdout.splitlines()[-1])["path"] for r in results}
    assert paths == {str(cache_dir / reference[0].name)}
    assert digests(Path(paths.pop())) == reference[1]
    assert not list(cache_dir.glob("*.partial"))


# --- 5b. DDP ranks sharing one extraction (issue 7) -----------------------------------------------------------------

def _ddp_configs(tmp_path: Path, clip, cache_dir: Path, world: int) -> list[dict]:
    init = f"file://{tmp_path / 'ddp_init'}"
    return [{"records": [[r.key, str(r.image)] for r in clip], "cache_dir": str(cache_dir),
             "count_file": str(tmp_path / f"encoded{rank}.txt"), "ddp": {"rank": rank, "world": world, "init": init}}
            for rank in range(world)]


@pytest.mark.e2e
def test_two_ddp_ranks_share_an_extraction_and_the_cache_is_byte_identical(clip, reference, tmp_path):
    """40 images = 5 chunks of 8: rank 0 encodes chunks 0, 2, 4 and rank 1 chunks 1, 3 into the same arrays; rank 0
    finalises. The arrays are byte-identical to a one-process extraction, and each image was encoded once."""
    cache_dir = tmp_path / "cache"
    results = run_workers(tmp_path, _ddp_configs(tmp_path, clip, cache_dir, 2))
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert [encoded(tmp_path / f"encoded{rank}.txt") for rank in range(2)] == [24, 16]
    assert "rank 1 of 2 extracts 2 of the 5 chunks" in results[1].stderr
    paths = {json.loads(r.stdout.splitlines()[-1])["path"] for r in results}
    assert paths == {str(cache_dir / reference[0].name)}
    assert digests(Path(paths.pop())) == reference[1]
    manifest = json.loads((cache_dir / reference[0].name / "manifest.json").read_text())
    assert manifest["chunks"] == json.loads((reference[0] / "manifest.json").read_text())["chunks"]
    assert not list(cache_dir.glob("*.partial"))


@pytest.mark.e2e
def test_ddp_ranks_resume_a_one_process_extraction_killed_mid_way(clip, reference, tmp_path):
    """A one-process extraction killed after chunk 0 (rows 0-7) is finished by 2 ranks: only the 4 remaining
    chunks are encoded, 2 by each, and the result is byte-identical to an uninterrupted extraction."""
    cache_dir = tmp_path / "cache"
    [killed] = run_workers(tmp_path, [{"records": [[r.key, str(r.image)] for r in clip], "cache_dir": str(cache_dir),
                                        "count_file": str(tmp_path / "killed.txt"), "kill_at_forward": 4}])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(_recorded_chunks(cache_dir / f"{reference[0].name}.partial")) == [0]
    results = run_workers(tmp_path, _ddp_configs(tmp_path, clip, cache_dir, 2))
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert [encoded(tmp_path / f"encoded{rank}.txt") for rank in range(2)] == [16, 16]
    assert digests(cache_dir / reference[0].name) == reference[1]


# --- 6. no pickle -----------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a file: proof that a cache file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_cache_arrays_are_never_unpickled(reference, tmp_path):
    """Protection: the exact float16 .npy header is required and arrays are read with allow_pickle=False."""
    path = copy_reference(reference, tmp_path)
    marker = tmp_path / "pwned"
    np.save(path / "global.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(CacheDamagedError, match="does not start with the .npy header of a float16 array"):
        FeatureCache.open(path)
    with pytest.raises(ValueError):
        FeatureCache.open(path, verify=False)  # even unverified, numpy refuses to unpickle it
    assert not marker.exists()


# --- the worker process of the crash and concurrency tests -----------------------------------------------------------

def _worker(config_file: str) -> None:
    """Extract features as the config says, logging each encoder batch's size to count_file; optionally SIGKILL
    itself at the start of batch number `kill_at_forward`, or wait for a sibling process before starting."""
    import torch

    from captioner.encoders import EncoderSpec, FrozenEncoder

    cfg = json.loads(Path(config_file).read_text())
    torch.set_num_threads(cfg["threads"])  # the same threads as the test process: bit-identical features
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    encoder = FrozenEncoder(EncoderSpec(name="efficientnet_lite0", weights="package"))
    original, calls = encoder.forward, [0]

    def forward(x):
        calls[0] += 1
        if calls[0] == cfg.get("kill_at_forward"):
            os.kill(os.getpid(), signal.SIGKILL)
        with open(cfg["count_file"], "a") as f:
            f.write(f"{x.shape[0]}\n")
        time.sleep(cfg.get("forward_sleep", 0))
        return original(x)

    encoder.forward = forward
    if cfg.get("ready"):  # a barrier, so that both processes reach the cache at the same moment
        Path(cfg["ready"]).touch()
        deadline = time.monotonic() + 60
        while not Path(cfg["wait_for"]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    records = [CaptionRecord(image=Path(p), captions=["x"], split="train", key=k) for k, p in cfg["records"]]
    group = SOLO
    if cfg.get("ddp"):  # one rank of a DDP job: a gloo process group, as Lightning's DDP sets up
        rank, world = cfg["ddp"]["rank"], cfg["ddp"]["world"]
        torch.distributed.init_process_group("gloo", init_method=cfg["ddp"]["init"], rank=rank, world_size=world)
        group = ExtractionGroup.from_torch_distributed()
    cache = extract(encoder, records, Path(cfg["cache_dir"]), batch_size=cfg["batch_size"],
                    flush_every=cfg["flush_every"], group=group)
    print(json.dumps({"path": str(cache.path)}))


if __name__ == "__main__":
    _worker(sys.argv[1])
