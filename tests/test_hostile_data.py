"""Hostile inputs on the data side (issue 17): datasets whose splits cannot be trained or scored, a vocabulary
that leaves nothing, images of every PIL mode and bit depth, images changed under a feature cache, planted symbolic
links, a full disk, a read-only cache and unreadable files.

Each test asserts the behaviour a user sees: the refusal names the file or key, the value and the fix; pixels are
those of an expectation computed by hand; features are really recomputed, and only those; link targets and
read-only files are unchanged. Permission tests run in a forked child without CAP_DAC_OVERRIDE, so they hold when
the suite runs as root too; the full disk is a file-size limit (RLIMIT_FSIZE), which makes writes fail with EFBIG.
"""

from __future__ import annotations

import colorsys
import ctypes
import hashlib
import json
import logging
import os
import stat
import struct
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import counting, file_size_limit

from captioner.data.datamodule import CaptionDataModule
from captioner.data.records import CaptionRecord, DatasetError
from captioner.data.shapes import build_shapes
from captioner.data.vocabulary import MIN_WORDS, Vocabulary, build_vocabulary
from captioner.errors import ConfigError, DiskFullError, UserError
from captioner.features import CacheNotWritableError, FeatureCache, extract_features, source_fingerprint
from captioner.images import ImageReadError, load_image, to_rgb

ENCODER = {"name": "efficientnet_lite0", "weights": "package", "input_size": 224, "crop_pct": 1.0}
WORDS = "a red blue green circle square star left right above below of the small large".split()


# --- helpers ------------------------------------------------------------------------------------------------------

def csv_dataset(root: Path, splits: list[str | None], bad: set[int] = frozenset()) -> dict:
    """A `data=csv` dataset of 24x24 images, one per entry of `splits` (None: no split stated), two captions each;
    the images numbered in `bad` are text files named .jpg. Returns its data config."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = ["image,caption,split"]
    for i, split in enumerate(splits):
        name = f"img{i:02d}.jpg"
        if i in bad:
            (root / "images" / name).write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "images" / name)
        for _ in range(2):
            rows.append(f"{name},{' '.join(rng.choice(WORDS, 6))},{split or ''}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return {"name": "csv", "root": str(root),
            "reader": {"_target_": "captioner.data.formats.read_csv", "_partial_": True, "file": "captions.csv",
                       "images_dir": "images"}}


def datamodule(data: dict, cache_dir: Path, **kw) -> CaptionDataModule:
    options = dict(min_word_count=1, progress=False, batch_size=8, extraction={"num_workers": 0, "batch_size": 4})
    return CaptionDataModule(data, ENCODER, cache_dir=str(cache_dir), **{**options, **kw})


@pytest.fixture
def no_extraction(monkeypatch):
    """Refusals must come before any feature is extracted (minutes on a real dataset)."""
    import captioner.data.datamodule as dm

    monkeypatch.setattr(dm, "prepare_features", lambda *a, **k: pytest.fail("features extracted before refusing"))


def record(path: Path) -> CaptionRecord:
    return CaptionRecord(image=path, captions=["a picture ."], split="train", key=path.name)


def extract(encoder, records, cache_dir: Path, **kw) -> FeatureCache:
    options = dict(batch_size=4, flush_every=1, num_workers=0, progress=False)  # chunks of 4 rows
    return extract_features(encoder, records, cache_dir, "d", "train", **{**options, **kw})


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def png(path: Path, values: np.ndarray, color_type: int, depth: int = 16, trns: bytes | None = None) -> None:
    """A PNG written by hand (PIL cannot write 16-bit colour or 4-bit grey): `values` (H, W[, C]) unsigned."""
    h, w = values.shape[:2]
    if depth == 16:
        raw = [values[y].astype(">u2").tobytes() for y in range(h)]
    else:  # packed, most significant bits first
        per_byte = 8 // depth
        padded = np.zeros((h, -(-w // per_byte) * per_byte), np.uint8)
        padded[:, :w] = values
        shifts = np.arange(per_byte - 1, -1, -1) * depth
        raw = [(padded[y].reshape(-1, per_byte) << shifts).sum(1).astype(np.uint8).tobytes() for y in range(h)]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + (chunk(b"tRNS", trns) if trns else b"")
    body += chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + row for row in raw))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + 255 * (1 - a)


def without_file_override() -> bool:
    """In this (forked, single-threaded) process: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that file
    permissions bind root as they bind anyone. True when they now bind."""
    if os.geteuid() == 0:
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        libc = ctypes.CDLL(None, use_errno=True)
        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
        if libc.capget(ctypes.byref(header), data) != 0:
            return False
        keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
        data[0].effective &= keep
        data[0].permitted &= keep
        if libc.capset(ctypes.byref(header), data) != 0:
            return False
    return True


def in_child_without_file_override(checks: dict) -> dict:
    """Run each check (a function) in one forked child whose file permissions bind even root; returns
    {name: result or "raised <Type>: <message>"}. The child runs no torch computation (not fork-safe)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        results = {}
        try:
            os.close(read)
            if not without_file_override():
                results = {"skip": "cannot drop CAP_DAC_OVERRIDE"}
            else:
                for name, check in checks.items():
                    try:
                        results[name] = check()
                    except Exception as e:
                        results[name] = f"raised {type(e).__name__}: {e}"
        except BaseException:
            results = {"skip": traceback.format_exc()}
        finally:
            with os.fdopen(write, "w") as f:
                json.dump(results, f, default=str)
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        results = json.load(f)
    os.waitpid(pid, 0)
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


# --- 1. splits a stage cannot use are refused at setup, before extraction -----------------------------------------

def test_a_dataset_with_only_train_rows_is_refused_naming_the_splits_and_the_fix(tmp_path, no_extraction):
    data = csv_dataset(tmp_path / "d", ["train"] * 5)
    with pytest.raises(DatasetError) as err:
        datamodule(data, tmp_path / "cache").setup("fit")
    message = str(err.value)
    assert "the val and test splits have no usable image (train 5, val 0, test 0 images)" in message
    assert "Training needs images in all three splits" in message
    assert f"split=val and split=test to {tmp_path / 'd' / 'captions.csv'}" in message
    assert "leave the split column out" in message and isinstance(err.value, UserError)


def test_an_empty_train_split_is_refused(tmp_path, no_extraction):
    data = csv_dataset(tmp_path / "d", ["val", "val", "test"])
    with pytest.raises(DatasetError, match=r"the train split has no usable image \(train 0, val 2, test 1 images\)"):
        datamodule(data, tmp_path / "cache").setup("fit")


def test_a_shapes_world_without_val_images_says_which_key_to_set(tmp_path, no_extraction):
    data = {"name": "shapes", "root": str(tmp_path / "shapes"),
            "reader": {"_target_": "captioner.data.shapes.build_shapes", "_partial_": True, "num_train": 3,
                       "num_val": 0, "num_test": 1, "seed": 0, "image_size": 32}}
    with pytest.raises(DatasetError, match=r"the val split has no usable image .* Set data\.num_val to 1 or more"):
        datamodule(data, tmp_path / "cache").setup("fit")


def test_evaluation_needs_only_the_split_it_scores(tmp_path, lite0):
    data = csv_dataset(tmp_path / "d", ["train", "train", "val"])
    vocab = Vocabulary(WORDS)
    with pytest.raises(DatasetError) as err:  # eval.py split=test: there is none
        datamodule(data, tmp_path / "cache", vocab=vocab).setup("test")
    assert "This evaluation scores the test split (split=test)" in str(err.value)
    assert "or evaluate another split (split=val or split=test)" in str(err.value)
    dm = datamodule(data, tmp_path / "cache", vocab=vocab, test_split="val")  # eval.py split=val: fine
    dm.prepare_data()
    dm.setup("test")
    assert list(dm.caches) == ["val"]  # only the scored split was extracted
    assert len(dm.splits["val"]) == 1 and dm.feature_dim == 1280


def test_a_split_whose_images_are_all_unreadable_is_refused_after_extraction(tmp_path):
    data = csv_dataset(tmp_path / "d", ["train", "train", "val", "val", "test"], bad={2, 3})
    with pytest.raises(DatasetError) as err:
        datamodule(data, tmp_path / "cache").setup("fit")
    message = str(err.value)
    assert "the val split has no usable image (train 2, val 0, test 1 images)" in message
    assert "all 2 image(s) of val could not be read" in message
    assert str(tmp_path / "d" / "images" / "img02.jpg") in message and "cannot identify image file" in message


# --- 2. a vocabulary with (almost) no words -------------------------------------------------------------------------

def test_a_min_word_count_that_leaves_no_word_is_refused_with_what_is_allowed(tmp_path, no_extraction):
    data = csv_dataset(tmp_path / "d", ["train"] * 6 + ["val", "test"])
    train_words = [w for line in (tmp_path / "d" / "captions.csv").read_text().splitlines()[1:]
                   if line.endswith(",train") for w in line.split(",")[1].split()]
    counts = sorted((train_words.count(w) for w in set(train_words)), reverse=True)
    with pytest.raises(ConfigError) as err:
        datamodule(data, tmp_path / "cache", min_word_count=1000).setup("fit")
    message = str(err.value)
    assert message.startswith("text.min_word_count=1000 leaves 0 word(s) in the vocabulary besides <pad> <sos>")
    assert f"occurs {counts[0]} time(s)" in message
    assert f"Use text.min_word_count between 1 and {counts[MIN_WORDS - 1]}" in message
    vocab = build_vocabulary(iter([" ".join(train_words)]), counts[MIN_WORDS - 1])  # the largest allowed works
    assert len(vocab) - 4 >= MIN_WORDS


def test_captions_with_too_few_distinct_words_are_a_dataset_error():
    with pytest.raises(DatasetError, match=r"the train split has 2 distinct word\(s\) in its captions \(a, dog\)"):
        build_vocabulary(["a dog", "dog a"], 1)
    with pytest.raises(ConfigError, match=r"text.min_word_count=0: must be 1 or more"):
        build_vocabulary(["a dog"], 0)


# --- 3. images of every mode and bit depth become the RGB they show -----------------------------------------------

RNG = np.random.default_rng(7)
H, W = 6, 8


def _u8(*shape):
    return RNG.integers(0, 256, (H, W, *shape), dtype=np.uint8) if shape else RNG.integers(0, 256, (H, W),
                                                                                           dtype=np.uint8)


def _grey(values):
    return np.repeat(np.asarray(values, np.float64)[..., None], 3, axis=-1)


def _mode_1(tmp):
    bits = RNG.random((H, W)) > 0.5
    Image.fromarray(bits).save(tmp / "x.png")
    return tmp / "x.png", _grey(bits * 255.0)


def _mode_L(tmp):
    v = _u8()
    Image.fromarray(v).save(tmp / "x.png")
    return tmp / "x.png", _grey(v)


PALETTE = np.array([[200, 30, 30], [20, 180, 60], [10, 20, 230], [250, 240, 10]], np.uint8)


def _palette_image(index):
    im = Image.fromarray(index.astype(np.uint8), "L").convert("P")
    im.putpalette(PALETTE.reshape(-1).tolist() + [0] * (768 - PALETTE.size))
    return im


def _mode_P(tmp):
    index = RNG.integers(0, 4, (H, W))
    _palette_image(index).save(tmp / "x.png")
    return tmp / "x.png", PALETTE[index].astype(np.float64)


def _mode_P_transparent(tmp):
    index = RNG.integers(0, 4, (H, W))
    _palette_image(index).save(tmp / "x.png", transparency=2)
    expected = PALETTE[index].astype(np.float64)
    expected[index == 2] = 255
    return tmp / "x.png", expected


def _mode_PA(tmp):
    index, alpha = RNG.integers(0, 4, (H, W)), _u8()
    im = Image.merge("PA", (Image.fromarray(index.astype(np.uint8)), Image.fromarray(alpha)))
    im.putpalette(PALETTE.reshape(-1).tolist() + [0] * (768 - PALETTE.size))
    im.save(tmp / "x.tif")
    assert Image.open(tmp / "x.tif").mode == "PA"
    return tmp / "x.tif", on_white(PALETTE[index], alpha)


def _mode_LA(tmp):
    v, alpha = _u8(), _u8()
    Image.fromarray(np.stack([v, alpha], -1), "LA").save(tmp / "x.png")
    return tmp / "x.png", on_white(_grey(v), alpha)


def _mode_RGB(tmp):
    rgb = _u8(3)
    Image.fromarray(rgb).save(tmp / "x.png")
    return tmp / "x.png", rgb.astype(np.float64)


def _mode_RGBA(tmp):
    rgba = _u8(4)
    Image.fromarray(rgba).save(tmp / "x.png")
    return tmp / "x.png", on_white(rgba[..., :3], rgba[..., 3])


def _mode_CMYK(tmp):
    cmyk = _u8(4)
    Image.fromarray(cmyk, "CMYK").save(tmp / "x.tif")
    c, k = cmyk[..., :3] / 255.0, cmyk[..., 3:] / 255.0
    return tmp / "x.tif", 255 * (1 - c) * (1 - k)


def _mode_YCbCr(tmp):
    ycc = _u8(3).astype(np.float64)
    image = Image.fromarray(ycc.astype(np.uint8), "YCbCr")
    image.save(tmp / "x.tif")
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128  # JFIF (full-range BT.601)
    rgb = np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1), 0, 255)
    try:  # Pillow < 13 (what Gradio, the [demo] extra, allows) cannot read its own YCbCr TIFFs back
        Image.open(tmp / "x.tif").load()
    except OSError:
        return image, rgb  # then the conversion, ours, is tested on the image in memory
    return tmp / "x.tif", rgb


# CIE L*a*b* (D65) of sRGB colours, from the published conversion tables: an expectation no code here computes.
LAB_REFERENCE = {(255, 255, 255): (100.0, 0.0, 0.0), (119, 119, 119): (50.0, 0.0, 0.0),
                 (255, 0, 0): (53.2408, 80.0925, 67.2032), (0, 0, 255): (32.2970, 79.1875, -107.8602)}


def _mode_LAB(tmp):
    im = Image.new("LAB", (len(LAB_REFERENCE), 1))
    for x, (lightness, a, b) in enumerate(LAB_REFERENCE.values()):
        im.putpixel((x, 0), (round(lightness * 255 / 100), round(a) + 128, round(b) + 128))
    im.save(tmp / "x.tif")
    assert Image.open(tmp / "x.tif").mode == "LAB"
    return tmp / "x.tif", np.array([list(LAB_REFERENCE)], np.float64)


def _mode_HSV(tmp):
    hsv = _u8(3)
    expected = np.array([[colorsys.hsv_to_rgb(*(p / 255.0)) for p in row] for row in hsv]) * 255
    return Image.fromarray(hsv, "HSV"), expected  # no file format stores HSV: the image itself


def _mode_I_16bit_values(tmp):
    v = RNG.integers(0, 65536, (H, W)).astype(np.int32)
    Image.fromarray(v).save(tmp / "x.tif")
    assert Image.open(tmp / "x.tif").mode == "I"
    return tmp / "x.tif", _grey(v / 65535 * 255)


def _mode_I_8bit_values(tmp):
    v = RNG.integers(0, 256, (H, W)).astype(np.int32)
    Image.fromarray(v).save(tmp / "x.tif")
    return tmp / "x.tif", _grey(v)


def _mode_I16_png(tmp):
    v = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    png(tmp / "x.png", v, color_type=0)
    assert Image.open(tmp / "x.png").mode == "I;16"
    return tmp / "x.png", _grey(v / 65535 * 255)


def _mode_I16B_tiff(tmp):
    v = RNG.integers(0, 65536, (H, W)).astype(">u2")
    Image.fromarray(v).save(tmp / "x.tif")
    assert Image.open(tmp / "x.tif").mode == "I;16B"
    return tmp / "x.tif", _grey(v.astype(np.float64) / 65535 * 255)


def _mode_I16_png_transparent(tmp):
    v = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    v[0, :3] = 40000
    png(tmp / "x.png", v, color_type=0, trns=struct.pack(">H", 40000))
    expected = _grey(v / 65535 * 255)
    expected[v == 40000] = 255
    return tmp / "x.png", expected


def _mode_F(tmp):
    v = RNG.random((H, W)).astype(np.float32)
    Image.fromarray(v).save(tmp / "x.tif")
    assert Image.open(tmp / "x.tif").mode == "F"
    return tmp / "x.tif", _grey(v * 255.0)


def _rgb16_png(tmp):
    v = RNG.integers(0, 65536, (H, W, 3)).astype(np.uint16)
    png(tmp / "x.png", v, color_type=2)
    return tmp / "x.png", v / 65535 * 255


def _grey_alpha16_png(tmp):
    v = RNG.integers(0, 65536, (H, W, 2)).astype(np.uint16)
    png(tmp / "x.png", v, color_type=4)
    return tmp / "x.png", on_white(_grey(v[..., 0] / 65535 * 255), v[..., 1] / 65535 * 255)


def _grey4_png(tmp):
    v = RNG.integers(0, 16, (H, W)).astype(np.uint8)
    png(tmp / "x.png", v, color_type=0, depth=4)
    return tmp / "x.png", _grey(v * 17.0)


def _animated_gif(tmp):
    frames = [Image.new("RGB", (W, H), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(tmp / "x.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp / "x.gif").n_frames == 3
    return tmp / "x.gif", np.full((H, W, 3), (255, 0, 0), np.float64)


def _multipage_tiff(tmp):
    pages = [Image.new("RGB", (W, H), c) for c in [(10, 200, 30), (0, 0, 0)]]
    pages[0].save(tmp / "x.tif", save_all=True, append_images=pages[1:])
    assert Image.open(tmp / "x.tif").n_frames == 2
    return tmp / "x.tif", np.full((H, W, 3), (10, 200, 30), np.float64)


# case -> (how to make it, how far a channel may be from the expectation: rounding, PIL's fixed-point maths,
# 16-bit PNG colour read as its high byte, L*a*b* quantised to whole numbers)
MODES = {
    "1": (_mode_1, 0), "L": (_mode_L, 0), "P": (_mode_P, 0), "P_transparent": (_mode_P_transparent, 0),
    "PA": (_mode_PA, 1), "LA": (_mode_LA, 1), "RGB": (_mode_RGB, 0), "RGBA": (_mode_RGBA, 1),
    "CMYK": (_mode_CMYK, 1), "YCbCr": (_mode_YCbCr, 2), "LAB": (_mode_LAB, 3), "HSV": (_mode_HSV, 1),
    "I_16bit_values": (_mode_I_16bit_values, 0.5), "I_8bit_values": (_mode_I_8bit_values, 0),
    "I;16_png": (_mode_I16_png, 0.5), "I;16B_tiff": (_mode_I16B_tiff, 0.5),
    "I;16_png_transparent": (_mode_I16_png_transparent, 0.5), "F_tiff": (_mode_F, 0.5),
    "RGB_16bit_png": (_rgb16_png, 1), "LA_16bit_png": (_grey_alpha16_png, 2), "L_4bit_png": (_grey4_png, 0),
    "animated_gif": (_animated_gif, 0), "multipage_tiff": (_multipage_tiff, 0),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_bit_depth_becomes_the_rgb_it_shows(mode, tmp_path):
    make, tolerance = MODES[mode]
    source, expected = make(tmp_path)
    im = load_image(source) if isinstance(source, Path) else to_rgb(source)
    assert im.mode == "RGB" and im.size == (expected.shape[1], expected.shape[0])
    error = np.abs(np.asarray(im, np.float64) - expected)
    assert error.max() <= tolerance, f"{mode}: off by up to {error.max():.1f} levels"


def test_high_bit_depth_images_reach_the_encoder_as_their_8_bit_twins(lite0, tmp_path):
    """16-bit grey PNG and TIFF, a float TIFF, a 32-bit integer TIFF and a CMYK TIFF give the features of the
    8-bit RGB image they show (a plain convert("RGB") gives a white or black image for the first four)."""
    records = []
    for mode in ("I;16_png", "I;16B_tiff", "F_tiff", "I_16bit_values", "CMYK"):
        folder = tmp_path / mode
        folder.mkdir()
        source, expected = MODES[mode][0](folder)
        Image.fromarray(np.rint(expected).astype(np.uint8)).save(folder / "twin.png")
        records += [CaptionRecord(image=source, captions=["x"], split="train", key=f"{mode}/source"),
                    CaptionRecord(image=folder / "twin.png", captions=["x"], split="train", key=f"{mode}/twin")]
    cache = extract(lite0, records, tmp_path / "cache", batch_size=8)
    assert cache.failed == {}
    pooled = cache.pooled.astype(np.float32)
    np.testing.assert_allclose(pooled[0::2], pooled[1::2], atol=0.02)


def test_a_pipe_named_like_an_image_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(tmp_path / "pipe.jpg")
    assert source_fingerprint(tmp_path / "pipe.jpg") is None


# --- 4. a cached feature never outlives a change of its source image ----------------------------------------------

@pytest.fixture
def same_size_images(tmp_path):
    """11 uncompressed 32x32 PNGs of random pixels: all of one byte size, so one can replace another unnoticed by
    size. Written an hour ago (by mtime), so that their fingerprints are trusted without hashing."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(11):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, compress_level=0)
        an_hour_ago = (path.stat().st_mtime_ns - 3600 * 10**9)
        os.utime(path, ns=(an_hour_ago, an_hour_ago))
        paths.append(path)
    assert len({p.stat().st_size for p in paths}) == 1
    return paths


def test_an_image_replaced_by_another_of_the_same_size_and_mtime_is_re_extracted_alone(
        same_size_images, lite0, tmp_path, caplog, monkeypatch):
    import captioner.features.cache as features

    # the 2 s guard against coarse timestamps would have every image of a millisecond-long test hashed again
    monkeypatch.setattr(features, "RACY_NS", 0)
    records = [record(p) for p in same_size_images[:10]]
    before = extract(lite0, records, tmp_path / "cache")
    old_rows = np.array(before.pooled)
    old_chunks = json.loads((before.path / "manifest.json").read_text())["chunks"]["global.npy"]

    changed = same_size_images[5]
    st = changed.stat()
    with open(changed, "r+b") as f:  # in place: same inode, same size, and the mtime put back
        f.write(same_size_images[10].read_bytes())
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = changed.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)

    hashed = []
    original = features.source_fingerprint
    monkeypatch.setattr(features, "source_fingerprint", lambda p: (hashed.append(Path(p).name), original(p))[1])
    with counting(lite0) as batches, caplog.at_level(logging.WARNING, logger="captioner.features"):
        after = extract(lite0, records, tmp_path / "cache")
    assert batches == [1]  # one image encoded, the other nine not
    assert set(hashed) == {changed.name}  # unchanged images cost one stat each, no read
    assert "1 of 10 image(s) changed since their features were extracted (05.png): re-extracting those only" \
        in caplog.text
    new = np.array(after.pooled)
    reference = extract(lite0, [record(same_size_images[10])], tmp_path / "reference").pooled
    np.testing.assert_allclose(new[5].astype(np.float32), reference[0].astype(np.float32), atol=2e-3)
    assert np.abs(new[5].astype(np.float32) - old_rows[5].astype(np.float32)).max() > 0.1
    assert np.array_equal(np.delete(new, 5, axis=0), np.delete(old_rows, 5, axis=0))
    new_chunks = json.loads((after.path / "manifest.json").read_text())["chunks"]["global.npy"]
    assert [a == b for a, b in zip(old_chunks, new_chunks)] == [True, False, True]  # rows 4-7 re-checksummed
    FeatureCache.open(after.path)  # the checksums match the new rows
    with counting(lite0) as batches:
        extract(lite0, records, tmp_path / "cache")
    assert batches == []  # recorded: not re-extracted again


def test_an_image_replaced_by_a_file_of_another_size_is_re_extracted(same_size_images, tiny_shapes, lite0,
                                                                     tmp_path):
    records = [record(p) for p in same_size_images[:6]]
    extract(lite0, records, tmp_path / "cache")
    same_size_images[2].write_bytes(tiny_shapes.split("val")[0].image.read_bytes())  # a JPEG under a .png name
    with counting(lite0) as batches:
        after = extract(lite0, records, tmp_path / "cache")
    reference = extract(lite0, [record(same_size_images[2])], tmp_path / "reference").pooled
    assert batches == [1]
    np.testing.assert_allclose(after.pooled[2].astype(np.float32), reference[0].astype(np.float32), atol=2e-3)


def test_a_touched_image_keeps_its_features_and_a_deleted_one_loses_them(same_size_images, lite0, tmp_path):
    records = [record(p) for p in same_size_images[:6]]
    before = np.array(extract(lite0, records, tmp_path / "cache").pooled)
    os.utime(same_size_images[1])  # touched: same bytes
    with counting(lite0) as batches:
        after = extract(lite0, records, tmp_path / "cache")
    assert batches == [] and np.array_equal(np.array(after.pooled), before)
    same_size_images[3].unlink()
    with counting(lite0) as batches:
        after = extract(lite0, records, tmp_path / "cache")
    assert batches == [1] and list(after.failed) == ["03.png"] and "file not found" in after.failed["03.png"]
    assert not after.pooled[3].any()


def test_an_unreadable_image_fixed_later_is_extracted_by_the_next_run(same_size_images, lite0, tmp_path):
    records = [record(p) for p in same_size_images[:6]]
    good = same_size_images[4].read_bytes()
    same_size_images[4].write_bytes(good[:100])  # truncated
    assert list(extract(lite0, records, tmp_path / "cache").failed) == ["04.png"]
    same_size_images[4].write_bytes(good)
    with counting(lite0) as batches:
        fixed = extract(lite0, records, tmp_path / "cache")
    assert batches == [1] and fixed.failed == {} and fixed.pooled[4].any()


# --- 5. nothing is ever written through a planted symbolic link ----------------------------------------------------

SMALL_WORLD = dict(num_train=3, num_val=2, num_test=2, seed=5, image_size=32, progress=False)


def test_links_planted_in_a_shapes_world_are_replaced_and_their_targets_untouched(tmp_path, caplog):
    world = build_shapes(tmp_path / "data", **SMALL_WORLD)
    folder = world.root
    originals = {p.name: p.read_bytes() for p in (folder / "images").iterdir()}
    annotations = (folder / "annotations.json").read_text()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep")
    notes = outside / "notes.json"
    notes.write_text('{"keep": true}')
    image = folder / "images" / "train_000001.jpg"
    image.unlink()
    image.symlink_to(victim)
    (folder / "annotations.json").unlink()
    (folder / "annotations.json").symlink_to(notes)

    with caplog.at_level(logging.WARNING, logger="captioner.data.shapes"):
        again = build_shapes(tmp_path / "data", **SMALL_WORLD)
    assert victim.read_text() == "keep" and notes.read_text() == '{"keep": true}'
    assert not image.is_symlink() and image.read_bytes() == originals[image.name]
    assert not (folder / "annotations.json").is_symlink()
    assert json.loads((folder / "annotations.json").read_text()) == json.loads(annotations)
    assert [(r.key, r.captions) for r in again.records] == [(r.key, r.captions) for r in world.records]
    assert "regenerated 1 image(s) (images/train_000001.jpg) and annotations.json" in caplog.text


def test_a_shapes_images_folder_or_world_folder_linked_elsewhere_is_never_written_into(tmp_path):
    world = build_shapes(tmp_path / "data", **SMALL_WORLD)
    originals = {p.name: p.read_bytes() for p in (world.root / "images").iterdir()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    for planted in (world.root / "images", world.root):
        os.rename(planted, tmp_path / f"moved-{planted.name}")
        planted.symlink_to(elsewhere, target_is_directory=True)
        build_shapes(tmp_path / "data", **SMALL_WORLD)
        assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
        assert not planted.is_symlink() and planted.is_dir()
    assert {p.name: p.read_bytes() for p in (world.root / "images").iterdir()} == originals


def test_vocabulary_save_replaces_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "vocab.json").symlink_to(victim)
    Vocabulary(["dog"]).save(tmp_path / "vocab.json")
    assert victim.read_text() == "keep" and not (tmp_path / "vocab.json").is_symlink()
    assert Vocabulary.load(tmp_path / "vocab.json").itos[-1] == "dog"


def test_feature_cache_lock_and_partial_folder_links_are_never_followed(same_size_images, lite0, tmp_path):
    records = [record(p) for p in same_size_images[:2]]
    probe = extract(lite0, records, tmp_path / "probe")
    key = probe.path.name
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache_dir / f"{key}.lock").symlink_to(outside / "created-through-the-link")  # dangling: O_CREAT would make it
    (cache_dir / f"{key}.partial").symlink_to(outside, target_is_directory=True)
    cache = extract(lite0, records, cache_dir)
    assert list(outside.iterdir()) == []
    assert not (cache_dir / f"{key}.lock").is_symlink() and cache.path == cache_dir / key
    np.testing.assert_array_equal(np.array(cache.pooled), np.array(probe.pooled))


# --- 6. a full disk, a read-only cache, unreadable files ------------------------------------------------------------

def test_a_full_disk_while_building_the_cache_is_one_error_naming_the_file_and_leaves_nothing(
        same_size_images, lite0, tmp_path):
    records = [record(p) for p in same_size_images[:8]]
    cache_dir = tmp_path / "cache"
    with file_size_limit(256 * 1024), pytest.raises(DiskFullError) as err:  # spatial.npy needs 1 MB
        extract(lite0, records, cache_dir, spatial=True)
    message = str(err.value)
    assert "spatial.npy: could not be written: File too large" in message and ".partial" in message
    assert isinstance(err.value, UserError) and isinstance(err.value, OSError)
    assert sorted(p.name for p in cache_dir.iterdir()) == [next(cache_dir.glob("*.lock")).name]  # no entry, no temp
    cache = extract(lite0, records, cache_dir, spatial=True)  # space freed: the same command works
    assert cache.failed == {} and cache.spatial.shape[0] == 8
    FeatureCache.open(cache.path)


def test_a_full_disk_while_generating_the_shapes_world_leaves_no_folder(tmp_path):
    with file_size_limit(600), pytest.raises(DiskFullError) as err:
        build_shapes(tmp_path / "data", **SMALL_WORLD)
    assert f"{tmp_path / 'data'}" in str(err.value) and "the shapes world could not be written" in str(err.value)
    assert "File too large" in str(err.value)
    assert "data.root=" in str(err.value)
    assert list((tmp_path / "data").iterdir()) == []  # neither the folder nor its temp sibling
    assert len(build_shapes(tmp_path / "data", **SMALL_WORLD).records) == 7


def test_read_only_cache_and_unreadable_images(same_size_images, lite0, tmp_path):
    """In a child whose file permissions bind root too: a complete cache in a read-only directory is used; a
    cache that would have to be written there, or re-extracted for a changed image, is one error naming the
    directory and paths.cache_dir; an image without read permission is a counted skip saying so."""
    records = [record(p) for p in same_size_images[:3]]
    cache_dir = tmp_path / "cache"
    entry = extract(lite0, records, cache_dir).path
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "x.png").write_bytes(same_size_images[3].read_bytes())
    locked = tmp_path / "locked.png"
    locked.write_bytes(same_size_images[4].read_bytes())
    locked.chmod(0)
    for path in (entry, cache_dir):
        for p in [*path.iterdir(), path]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = digests(entry)

    def changed_image():
        same_size_images[0].write_bytes(same_size_images[5].read_bytes())
        return extract(lite0, records, cache_dir).path

    try:
        results = in_child_without_file_override({
            "readable": lambda: open(locked, "rb").read() and "read",
            "complete": lambda: str(extract(lite0, records, cache_dir).path),
            "missing": lambda: str(extract(lite0, [record(stranger / "x.png")], cache_dir).path),
            "changed": changed_image,
            "locked_image": lambda: load_image(locked),
            "locked_fingerprint": lambda: source_fingerprint(locked),
        })
    finally:
        for p in [cache_dir, entry, *entry.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert results["readable"].startswith("raised PermissionError")  # the child really is bound by permissions
    assert results["complete"] == str(entry)
    for case in ("missing", "changed"):
        assert results[case].startswith(f"raised {CacheNotWritableError.__name__}: "), results[case]
        assert "cannot write the feature cache there (Permission denied)" in results[case]
        assert f"Make {cache_dir} writable" in results[case] and "paths.cache_dir=" in results[case]
    assert str(entry) in results["changed"]  # names the file it had to write
    assert results["locked_image"] == f"raised ImageReadError: {locked}: permission denied; make it readable " \
                                      "(chmod a+r) or run as a user who may read it"
    assert results["locked_fingerprint"] is None
    assert digests(entry) == before  # nothing in the read-only cache changed
    assert issubclass(CacheNotWritableError, UserError)
