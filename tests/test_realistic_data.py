"""The realistic Flickr8k-format fixture (tests/fixtures/realistic/build.py) is what it claims to be: the readers
see the images, splits, captions and messy lines its tables describe, the Karpathy JSON holds the same data, the
photos are of mixed sizes and aspect ratios and all load, and the captions make a usable vocabulary."""

from __future__ import annotations

import hashlib
import json
import string
from collections import Counter

from PIL import Image

from captioner.data import formats as F
from captioner.data.formats import read_flickr8k, read_karpathy
from captioner.data.vocabulary import Vocabulary, tokenize
from captioner.images import load_image
from conftest import load_realistic_builder

B = load_realistic_builder()


def _karpathy(root, **kwargs):
    return read_karpathy(root, json_file=B.KARPATHY_JSON, images_dir=B.IMAGES_DIR, **kwargs)


def _ratio(size) -> float:
    return round(size[0] / size[1], 2)


def _frac(w: int, h: int) -> tuple[int, int]:
    """The nearest of the common photo aspect ratios, or the exact one when none is within 2 %."""
    for a, b in ((16, 9), (4, 3), (3, 2), (1, 1), (3, 4), (2, 3)):
        if abs(w / h - a / b) < 0.02 * a / b:
            return a, b
    return w, h


def test_flickr8k_reader_gives_the_splits_and_captions_of_the_tables(realistic_flickr8k):
    ds = read_flickr8k(realistic_flickr8k)
    names = B.split_names()
    for split in ("train", "val", "test"):
        assert [r.key for r in ds.split(split)] == sorted(f"{B.IMAGES_DIR}/{n}" for n in names[split])
    assert {s: len(n) for s, n in names.items()} == {"train": 24, "val": 6, "test": 6}
    assert len(B.PHOTOS) == 37 and sum(p.split is None for p in B.PHOTOS) == 1
    assert {r.key: r.captions for r in ds.records} == B.expected_captions("flickr8k")
    # what the quirky lines leave: the spaces-for-TAB caption kept, the Latin-1 byte replaced, a double space kept
    caps = {c for r in ds.records for c in r.captions}
    for (slug, k), quirk in B.LINE_QUIRKS.items():
        written = B.BY_SLUG[slug].captions[k]
        if quirk == "spaces":
            assert written in caps
        else:  # latin-1
            assert written not in caps and "".join(ch if ord(ch) < 128 else "\ufffd" for ch in written) in caps
    assert any("  " in c for c in caps)
    per_image = Counter(len(r.captions) for r in ds.records)
    assert min(per_image) == 1 and max(per_image) == 6 and per_image.most_common(1)[0][0] == 5


def test_flickr8k_reader_counts_every_messy_line_where_it_is(realistic_flickr8k):
    rep = read_flickr8k(realistic_flickr8k).skipped
    expected = B.expected_skips()
    assert dict(rep.counts) == dict(expected)
    # the fixture keeps the messiness of real copies
    assert {F.DUPLICATE_CAPTION, F.EMPTY_CAPTION, F.NO_ALNUM_CAPTION, F.WRONG_FIELDS, F.BAD_NAME_K, F.MISSING_IMAGE,
            F.BAD_BYTES, F.NO_SPLIT} <= set(expected)
    for reason, lines in B.expected_skip_lines().items():
        assert rep.examples[reason] == lines[:rep.max_examples], reason
    assert rep.examples[F.NO_SPLIT] == [p.key for p in B.PHOTOS if p.split is None]
    data = (realistic_flickr8k / B.TOKEN_FILE).read_bytes()
    assert b"\r\n" in data and data.count(b"\n") > 2 * data.count(b"\r\n")  # some lines CRLF, most LF
    assert (realistic_flickr8k / B.SPLIT_FILES["val"]).read_bytes().count(b"\r\n") == 6


def test_karpathy_json_holds_the_same_data(realistic_flickr8k):
    tok, kar = read_flickr8k(realistic_flickr8k), _karpathy(realistic_flickr8k)
    assert {r.key: r.split for r in kar.records} == {r.key: r.split for r in tok.records}
    assert {r.key: r.captions for r in kar.records} == B.expected_captions("karpathy")
    # caption for caption the same, except where the token file has the Latin-1 byte (the JSON is proper UTF-8)
    differ = [(a, b) for rk, rt in zip(kar.records, tok.records) for a, b in zip(rk.captions, rt.captions, strict=True)
              if a != b]
    assert [a for a, _ in differ] == [B.BY_SLUG[s].captions[k] for (s, k), q in B.LINE_QUIRKS.items()
                                      if q == "latin-1"]
    assert all("\ufffd" in b and "\ufffd" not in a for a, b in differ)
    assert dict(kar.skipped.counts) == dict(B.expected_karpathy_skips()) == {F.DUPLICATE_CAPTION: 1}
    # restval images are train images, as the readers take them by default; dropped on request
    restval = {p.key for p in B.PHOTOS if p.restval}
    assert restval and all(p.split == "train" for p in B.PHOTOS if p.restval)
    dropped = _karpathy(realistic_flickr8k, restval=None)
    assert dropped.skipped.counts[F.RESTVAL_DROPPED] == len(restval)
    assert {r.key for r in dropped.records} == {r.key for r in kar.records} - restval


def test_karpathy_json_has_karpathys_fields_and_tokens(realistic_flickr8k):
    data = json.loads((realistic_flickr8k / B.KARPATHY_JSON).read_text(encoding="utf-8"))
    assert data["dataset"] == "flickr8k" and len(data["images"]) == sum(p.split is not None for p in B.PHOTOS)
    sentids = []
    for imgid, entry in enumerate(data["images"]):
        assert set(entry) == {"filename", "imgid", "split", "sentences", "sentids"} and entry["imgid"] == imgid
        assert entry["split"] in {"train", "val", "test", "restval"}
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        for s in entry["sentences"]:
            assert set(s) == {"raw", "tokens", "imgid", "sentid"} and s["imgid"] == imgid
            assert s["tokens"] == B.karpathy_tokens(s["raw"]) and s["tokens"]
            assert all(t == t.lower() and not set(t) & set(string.punctuation) for t in s["tokens"])
        sentids += entry["sentids"]
    assert sentids == list(range(len(sentids)))
    tokens = {t for e in data["images"] for s in e["sentences"] for t in s["tokens"]}
    assert {"mans", "tshirt", "blackandwhite", "cats", "regionbased"} <= tokens  # "man's", "t-shirt", ...


def test_photos_are_of_mixed_sizes_and_all_load(realistic_flickr8k):
    upright = {}
    for p in B.PHOTOS:
        path = realistic_flickr8k / p.key
        with Image.open(path) as raw:
            stored, mode, fmt, orientation = raw.size, raw.mode, raw.format, raw.getexif().get(B.EXIF_ORIENTATION)
        assert (mode, fmt) == (p.mode, "PNG" if p.mode == "RGBA" else "JPEG"), p.slug
        want = B.photo_image(p).size
        im = load_image(path)
        assert im.mode == "RGB" and im.size == want, p.slug
        if p.exif_rotated:  # stored sideways, turned upright by the reader
            assert orientation == 6 and stored == want[::-1]
        else:
            assert orientation is None and stored == want
        upright[p.key] = want
    sizes = list(upright.values())
    assert len({_ratio(s) for s in sizes}) >= 10
    assert sum(w != h for w, h in sizes) >= 0.75 * len(sizes)
    assert any(w < h for w, h in sizes) and any(w >= 3 * h for w, h in sizes) and any(h >= 3 * w for w, h in sizes)
    assert min(max(s) for s in sizes) <= 100 and max(max(s) for s in sizes) >= 1200
    assert {(16, 9), (4, 3), (3, 2), (1, 1), (3, 4)} <= {_frac(w, h) for w, h in sizes}
    for split in ("train", "val", "test"):
        ratios = {_ratio(upright[p.key]) for p in B.PHOTOS if p.split == split}
        assert len(ratios) >= 4, split
    assert sum(p.mode == "L" for p in B.PHOTOS) >= 5 and sum(p.exif_rotated for p in B.PHOTOS) == 1


def test_captions_look_human_and_make_a_usable_vocabulary(realistic_flickr8k):
    ds = read_flickr8k(realistic_flickr8k)
    every = [c for r in ds.records for c in r.captions]
    for mark in (".", ",", "'s", "-", '"', "(", "&"):
        assert any(mark in c for c in every), mark
    assert any(ch.isdigit() for c in every for ch in c)
    assert sum(len(c.split()) > 20 for c in every) >= 3
    assert any(c.endswith(" .") for c in every) and any(c[-1].isalpha() for c in every)
    assert all(c[0].isupper() or c[0].isdigit() for c in every)
    train = [c for r in ds.split("train") for c in r.captions]
    vocab = Vocabulary.build(train, min_count=2)
    assert len(vocab) >= 100
    counts = Counter(t for c in every for t in tokenize(c))
    rare = [c for c in train if any(counts[t] == 1 for t in tokenize(c))]
    assert len(rare) >= 5 and all(vocab.unk_id in vocab.encode(c) for c in rare)
    held_out = [t for r in ds.records if r.split != "train" for c in r.captions for t in tokenize(c)]
    assert sum(t in vocab.stoi for t in held_out) >= 0.8 * len(held_out)  # val/test speak the train words


def test_build_is_deterministic(realistic_flickr8k, tmp_path):
    again = B.build_realistic(tmp_path / "again")
    files = sorted(p.relative_to(realistic_flickr8k) for p in realistic_flickr8k.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == len(B.PHOTOS) + 5
    digest = lambda root, rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()  # noqa: E731
    assert all(digest(realistic_flickr8k, rel) == digest(again, rel) for rel in files)
