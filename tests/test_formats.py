"""Readers for real caption dataset formats: exact file shapes, the quirks of real copies, hard errors, splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from captioner.data import formats as F
from captioner.data.formats import (
    describe_layout,
    flickr_split_counts,
    proportional_counts,
    read_coco,
    read_csv,
    read_flickr8k,
    read_flickr8k_csv,
    read_flickr30k,
    read_karpathy,
    seeded_split,
)
from captioner.config import options
from captioner.data.records import DatasetError


# --- helpers ------------------------------------------------------------------------------------------------------

def make_images(folder: Path, names) -> None:
    """Tiny real images: JPEG for .jpg, PNG for .png."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40 % 256, 80, 160)).save(folder / name)


def touch_images(folder: Path, names) -> None:
    """Empty files: readers only check existence, and this is fast for thousands of images."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()


def write_lines(path: Path, lines: list[str], newline: str = "\n", bom: bool = False) -> None:
    """Write lines as UTF-8; a line given as bytes is written verbatim (for non-UTF-8 bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"\xef\xbb\xbf" if bom else b""
    for line in lines:
        data += (line if isinstance(line, bytes) else line.encode("utf-8")) + newline.encode()
    path.write_bytes(data)


def line_no(lines: list, needle) -> int:
    """1-based number of the first line containing `needle` (str or bytes)."""
    as_bytes = lambda x: x if isinstance(x, bytes) else x.encode("utf-8")  # noqa: E731
    for i, line in enumerate(lines, start=1):
        if as_bytes(needle) in as_bytes(line):
            return i
    raise AssertionError(f"{needle!r} not in lines")


def by_key(ds) -> dict:
    return {r.key: r for r in ds.records}


# --- Flickr8k, original release -----------------------------------------------------------------------------------

A = "1000268201_693b08cb0e.jpg"
B = "1001773457_577c3a7d70.jpg"
C = "1002674143_1b742ab4b8.png"  # a .png among .jpg files
D = "1003163366_44323f5815.jpg"  # in no split list
E = "1007129816_e794419615.jpg"  # every caption of it is bad -> not emitted

A_CAPS = [
    "A child in a pink dress is climbing up a set of stairs in an entry way .",
    "A girl going into a wooden building .",
    "A little girl climbing into a wooden playhouse .",
    "A little girl climbing the stairs to her playhouse .",
    "A little girl in a pink dress going into a wooden cabin .",
]
B_CAPS = [
    "A black dog and a spotted dog are fighting",
    "A black dog and a tri-colored dog playing with each other on the road .",
    "A black dog and a white dog with brown spots are staring at each other in the street .",
    "Two dogs of different breeds looking at each other on the road .",
    "Two dogs on pavement moving toward each other .",
]


def flickr8k_token_lines() -> list:
    lines = [f"{A}#{k}\t{c}" for k, c in enumerate(A_CAPS)]
    lines.append(f"{A}#4\t{A_CAPS[4]}")  # exact duplicate line
    lines.append("")  # blank line: silent
    lines += [f"{B}#{k}\t{c}" for k, c in enumerate(B_CAPS)]
    lines.append(f"{B}#5\tA dog in the caf\xe9 garden .".encode("latin-1"))  # 6th caption, non-UTF-8 byte
    lines.append(f"{C}#0\tA little girl covered in paint sits in front of a painted rainbow .   ")  # 1 caption
    lines.append(f"{D}#0\tA man in an orange hat starring at something .")
    lines.append("2258277193_586949ec62.jpg.1#0\tThe boy in the red shirt is sitting on the bench .")  # no image
    lines.append(f"{E}#0\t")  # empty caption
    lines.append(f"{E}#1\t. . .")  # punctuation only
    lines.append(f"{A}#9\tA girl .\tA second caption field")  # wrong number of fields
    lines.append(f"{A}\tA girl without a #k field .")  # malformed name#k
    lines.append("../../etc/passwd#0\tA secret .")  # escapes the root
    lines.append("/etc/passwd#0\tAn absolute path .")  # escapes the root too
    return lines


def make_flickr8k(root: Path, *, lines=None, bom=True, newline="\r\n") -> list:
    lines = flickr8k_token_lines() if lines is None else lines
    write_lines(root / "Flickr8k.token.txt", lines, newline=newline, bom=bom)
    write_lines(root / "Flickr_8k.trainImages.txt", [A, B], newline=newline)
    write_lines(root / "Flickr_8k.devImages.txt", [C, "9999999999_0000000000.jpg"], newline=newline)
    write_lines(root / "Flickr_8k.testImages.txt", [E], newline=newline)
    make_images(root / "Flicker8k_Dataset", [A, B, C, D, E])
    return lines


def test_flickr8k_records_splits_and_captions(tmp_path):
    make_flickr8k(tmp_path)
    ds = read_flickr8k(tmp_path)
    recs = by_key(ds)
    assert ds.name == "flickr8k" and ds.root == tmp_path.resolve()
    assert list(recs) == sorted(recs) == [f"Flicker8k_Dataset/{n}" for n in (A, B, C)]
    a, b, c = recs[f"Flicker8k_Dataset/{A}"], recs[f"Flicker8k_Dataset/{B}"], recs[f"Flicker8k_Dataset/{C}"]
    assert a.image == (tmp_path / "Flicker8k_Dataset" / A).resolve() and a.image.is_absolute()
    assert a.captions == A_CAPS  # BOM, CRLF and the duplicate line gone
    assert len(b.captions) == 6 and b.captions[5] == "A dog in the caf\ufffd garden ."  # kept, bad byte replaced
    assert c.captions == ["A little girl covered in paint sits in front of a painted rainbow ."]  # stripped
    assert (a.split, b.split, c.split) == ("train", "train", "val")
    assert ds.counts() == {"train": (2, 11), "val": (1, 1), "test": (0, 0)}


def test_flickr8k_quirks_are_counted_with_line_numbers(tmp_path):
    lines = make_flickr8k(tmp_path)
    rep = read_flickr8k(tmp_path).skipped
    at = lambda needle: f"Flickr8k.token.txt:{line_no(lines, needle)}"  # noqa: E731
    assert rep.counts[F.DUPLICATE_CAPTION] == 1
    assert rep.examples[F.DUPLICATE_CAPTION] == ["Flickr8k.token.txt:6"]
    assert rep.counts[F.MISSING_IMAGE] == 1 and rep.examples[F.MISSING_IMAGE] == [at("2258277193_586949ec62.jpg.1")]
    assert rep.examples[F.EMPTY_CAPTION] == [at(f"{E}#0")]
    assert rep.examples[F.NO_ALNUM_CAPTION] == [at(f"{E}#1")]
    assert rep.examples[F.WRONG_FIELDS] == [at("A second caption field")]
    assert rep.examples[F.BAD_NAME_K] == [at("without a #k")]
    assert rep.counts[F.ESCAPES_ROOT] == 2
    assert rep.examples[F.ESCAPES_ROOT] == [at("../../etc/passwd"), at("/etc/passwd#0\tAn absolute")]
    assert rep.examples[F.BAD_BYTES] == [at(b"caf\xe9")]
    assert rep.examples[F.NO_SPLIT] == [f"Flicker8k_Dataset/{D}"]
    # listed in the dev list without captions, and E whose every caption was dropped
    assert rep.examples[F.LISTED_WITHOUT_CAPTIONS] == ["Flickr_8k.devImages.txt:2", "Flickr_8k.testImages.txt:1"]
    # blank lines and the BOM/CRLF are not reported at all
    assert set(rep.counts) == {F.DUPLICATE_CAPTION, F.MISSING_IMAGE, F.EMPTY_CAPTION, F.NO_ALNUM_CAPTION,
                               F.WRONG_FIELDS, F.BAD_NAME_K, F.ESCAPES_ROOT, F.BAD_BYTES, F.NO_SPLIT,
                               F.LISTED_WITHOUT_CAPTIONS}
    assert "image file missing: 1" in rep.summary()


def test_flickr8k_same_result_with_lf_and_no_bom(tmp_path):
    crlf, lf = tmp_path / "crlf", tmp_path / "lf"
    make_flickr8k(crlf)
    make_flickr8k(lf, bom=False, newline="\n")
    one, two = read_flickr8k(crlf), read_flickr8k(lf)
    assert [(r.key, r.captions, r.split) for r in one.records] == [(r.key, r.captions, r.split) for r in two.records]


def test_flickr8k_custom_split_files_and_spaces_instead_of_tab(tmp_path):
    make_images(tmp_path / "imgs", [A, B])
    write_lines(tmp_path / "tok.txt", [f"{A}#0 {A_CAPS[0]}", f"{B}#0\t{B_CAPS[0]}"])
    write_lines(tmp_path / "tr.txt", [A])
    write_lines(tmp_path / "te.txt", [B])
    ds = read_flickr8k(tmp_path, token_file="tok.txt", images_dir="imgs", split_files={"train": "tr.txt",
                                                                                         "test": "te.txt"})
    assert [(r.key, r.split, r.captions) for r in ds.records] == [
        (f"imgs/{A}", "train", [A_CAPS[0]]), (f"imgs/{B}", "test", [B_CAPS[0]])]


def test_flickr8k_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DatasetError) as err:
        read_flickr8k(missing)
    msg = str(err.value)
    assert str(missing) in msg
    for part in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
                 "Flicker8k_Dataset/*.jpg"):
        assert part in msg


def test_flickr8k_missing_annotation_files(tmp_path):
    with pytest.raises(DatasetError, match=r"Flickr8k\.token\.txt not found") as err:
        read_flickr8k(tmp_path)
    assert "Flicker8k_Dataset/*.jpg" in str(err.value)
    make_flickr8k(tmp_path)
    (tmp_path / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DatasetError, match=r"Flickr_8k\.devImages\.txt not found"):
        read_flickr8k(tmp_path)


def test_flickr8k_zero_usable_images_raises_with_summary(tmp_path):
    make_flickr8k(tmp_path, lines=["2258277193_586949ec62.jpg.1#0\tThe boy is sitting on a bench .", "", f"{E}#0\t..."])
    with pytest.raises(DatasetError) as err:
        read_flickr8k(tmp_path)
    msg = str(err.value)
    assert str(tmp_path.resolve()) in msg
    assert "image file missing: 1" in msg and "caption has no letter or digit: 1" in msg


# --- Flickr8k, CSV copy -------------------------------------------------------------------------------------------

def test_flickr8k_csv_quotes_commas_and_quirks(tmp_path):
    lines = [
        "image,caption",
        f"{A},{A_CAPS[0]}",
        f'{A},"A girl, in pink, going into a wooden building ."',
        f'{A},"A girl says ""hello"" to her playhouse ."',
        f"{A},{A_CAPS[0]}",  # duplicate
        f"{B},{B_CAPS[0]}",
        f"{C},A little girl covered in paint .",
        f"{A},A girl,extra,field",  # wrong number of fields
        "../../etc/passwd,A secret .",
        f"{B},  !!  ",
        "2258277193_586949ec62.jpg.1,The boy is sitting on a bench .",
    ]
    write_lines(tmp_path / "captions.txt", lines, newline="\r\n", bom=True)
    make_images(tmp_path / "Images", [A, B, C])
    ds = read_flickr8k_csv(tmp_path)
    recs = by_key(ds)
    assert recs[f"Images/{A}"].captions == [A_CAPS[0], "A girl, in pink, going into a wooden building .",
                                             'A girl says "hello" to her playhouse .']
    assert sorted(r.split for r in ds.records) == ["test", "train", "val"]  # 3 images: every split non-empty
    rep = ds.skipped
    assert rep.examples[F.DUPLICATE_CAPTION] == ["captions.txt:5"]
    assert rep.examples[F.WRONG_FIELDS] == ["captions.txt:8"]
    assert rep.examples[F.ESCAPES_ROOT] == ["captions.txt:9"]
    assert rep.examples[F.NO_ALNUM_CAPTION] == ["captions.txt:10"]
    assert rep.examples[F.MISSING_IMAGE] == ["captions.txt:11"]


def test_flickr8k_csv_seeded_split_is_deterministic_and_seed_dependent(tmp_path):
    names = [f"{1000000000 + i}_{i:010x}.jpg" for i in range(40)]
    touch_images(tmp_path / "Images", names)
    write_lines(tmp_path / "captions.txt", ["image,caption"] + [f"{n},A dog runs on the grass ." for n in names])
    split = lambda seed: {r.key: r.split for r in read_flickr8k_csv(tmp_path, seed=seed).records}  # noqa: E731
    assert split(0) == split(0)
    assert split(0) != split(1)
    # 40 images is below 6000+1000: sizes scale with the full Flickr8k ratio 6000/1000/1091
    counts = read_flickr8k_csv(tmp_path).counts()
    assert {s: n for s, (n, _) in counts.items()} == dict(zip(("train", "val", "test"),
                                                              proportional_counts(40, (6000, 1000, 1091))))


def test_flickr8k_csv_full_size_gives_6000_1000_rest(tmp_path):
    names = [f"{i:010d}_abc.jpg" for i in range(8091)]
    touch_images(tmp_path / "Images", names)
    write_lines(tmp_path / "captions.txt", ["image,caption"] + [f"{n},A dog ." for n in names])
    counts = read_flickr8k_csv(tmp_path).counts()
    assert counts == {"train": (6000, 6000), "val": (1000, 1000), "test": (1091, 1091)}


def test_flickr8k_csv_with_official_split_lists(tmp_path):
    write_lines(tmp_path / "captions.txt", ["image,caption", f"{A},{A_CAPS[0]}", f"{B},{B_CAPS[0]}",
                                            f"{C},A girl ."])
    make_images(tmp_path / "Images", [A, B, C])
    write_lines(tmp_path / "splits/train.txt", [A])
    write_lines(tmp_path / "splits/test.txt", [B, A])  # A twice in different lists: first kept
    ds = read_flickr8k_csv(tmp_path, split_files={"train": "splits/train.txt", "test": "splits/test.txt"})
    assert {r.key: r.split for r in ds.records} == {f"Images/{A}": "train", f"Images/{B}": "test"}
    assert ds.skipped.examples[F.SPLIT_CONFLICT] == ["splits/test.txt:2"]
    assert ds.skipped.examples[F.NO_SPLIT] == [f"Images/{C}"]


# --- Flickr30k ------------------------------------------------------------------------------------------------------

F30 = ["1000092795.jpg", "10002456.jpg", "1000268201.jpg", "1000344755.jpg"]


def test_flickr30k_token_format(tmp_path):
    lines = [
        f"{F30[0]}#0\tTwo young guys with shaggy hair look at their hands while hanging out in the yard .",
        f"{F30[0]}#1\tTwo young , White males are outside near many bushes .",
        f"{F30[1]}#0\tSeveral men in hard hats are operating a giant pulley system .",
        f"{F30[2]}#0\tA child in a pink dress is climbing up a set of stairs in an entry way .",
        f"{F30[3]}#0\tSomeone in a blue shirt and hat is standing on stairs and leaning against a window .",
        "2258277193.jpg#0\tA missing image .",
    ]
    write_lines(tmp_path / "results_20130124.token", lines)
    make_images(tmp_path / "flickr30k_images", F30)
    ds = read_flickr30k(tmp_path)
    assert len(ds.records) == 4 and by_key(ds)[f"flickr30k_images/{F30[0]}"].captions[1].startswith("Two young ,")
    assert sorted({r.split for r in ds.records}) == ["test", "train", "val"]
    assert ds.skipped.examples[F.MISSING_IMAGE] == ["results_20130124.token:6"]


def test_flickr30k_pipe_csv_copy(tmp_path):
    lines = [
        "image_name| comment_number| comment",
        f"{F30[0]}| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        f"{F30[0]} | 1 |  Two young , White males are outside near many bushes .  ",
        f"{F30[1]}| 0| Several men in hard hats are operating a giant pulley system .",
        f"{F30[1]}| 4 Several men in hard hats .",  # the real copy's row with a missing separator
        f"{F30[2]}| 0| A child in a pink dress is climbing up a set of stairs in an entry way .",
        f"{F30[3]}| 0| ",
    ]
    write_lines(tmp_path / "results.csv", lines)
    make_images(tmp_path / "flickr30k_images", F30)
    ds = read_flickr30k(tmp_path, captions_file="results.csv")
    recs = by_key(ds)
    assert recs[f"flickr30k_images/{F30[0]}"].captions == [
        "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        "Two young , White males are outside near many bushes ."]
    assert len(recs) == 3  # F30[3]'s only caption is empty
    assert ds.skipped.examples[F.WRONG_FIELDS] == ["results.csv:5"]
    assert ds.skipped.examples[F.EMPTY_CAPTION] == ["results.csv:7"]
    assert [r.split for r in ds.records] == [r.split for r in read_flickr30k(tmp_path, captions_file="results.csv")
                                             .records]


# --- Karpathy split JSON ----------------------------------------------------------------------------------------------

def sentence(raw, sentid):
    return {"tokens": raw.lower().rstrip(" .").split(), "raw": raw, "imgid": 0, "sentid": sentid}


def test_karpathy_flickr8k_json(tmp_path):
    images = [
        {"sentids": [0, 1], "imgid": 0, "split": "train", "filename": A,
         "sentences": [sentence(A_CAPS[0], 0), sentence(A_CAPS[0], 1)]},  # duplicate sentence
        {"sentids": [2], "imgid": 1, "split": "restval", "filename": B,
         "sentences": [{"tokens": ["two", "dogs", "on", "pavement"], "raw": "", "imgid": 1, "sentid": 2}]},
        {"sentids": [3], "imgid": 2, "split": "val", "filename": C, "sentences": [sentence("A girl .", 3)]},
        {"sentids": [4], "imgid": 3, "split": "test", "filename": D, "sentences": [sentence("?!", 4)]},
        {"sentids": [5], "imgid": 4, "split": "test", "filename": "2258277193_586949ec62.jpg.1",
         "sentences": [sentence("A boy .", 5)]},
        {"sentids": [6], "imgid": 5, "split": "test", "filename": "../../etc/passwd",
         "sentences": [sentence("A secret .", 6)]},
        {"imgid": 6, "split": "test"},  # no filename, no sentences
        {"sentids": [7], "imgid": 7, "split": "holdout", "filename": E, "sentences": [sentence("A dog .", 7)]},
    ]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    make_images(tmp_path / "Flicker8k_Dataset", [A, B, C, D, E])
    ds = read_karpathy(tmp_path, images_dir="Flicker8k_Dataset")
    recs = by_key(ds)
    assert [(k, r.split) for k, r in recs.items()] == [
        (f"Flicker8k_Dataset/{A}", "train"), (f"Flicker8k_Dataset/{B}", "train"), (f"Flicker8k_Dataset/{C}", "val")]
    assert recs[f"Flicker8k_Dataset/{B}"].captions == ["two dogs on pavement"]  # tokens when raw is empty
    rep = ds.skipped
    assert rep.examples[F.DUPLICATE_CAPTION] == ["dataset_flickr8k.json:images[0].sentences[1]"]
    assert rep.examples[F.NO_ALNUM_CAPTION] == ["dataset_flickr8k.json:images[3].sentences[0]"]
    assert rep.examples[F.MISSING_IMAGE] == ["dataset_flickr8k.json:images[4]"]
    assert rep.examples[F.ESCAPES_ROOT] == ["dataset_flickr8k.json:images[5]"]
    assert rep.examples[F.MALFORMED_ENTRY] == ["dataset_flickr8k.json:images[6]"]
    assert rep.examples[F.UNKNOWN_SPLIT] == ["dataset_flickr8k.json:images[7]"]

    dropped = read_karpathy(tmp_path, images_dir="Flicker8k_Dataset", restval=None)
    assert f"Flicker8k_Dataset/{B}" not in by_key(dropped)
    assert dropped.skipped.examples[F.RESTVAL_DROPPED] == ["dataset_flickr8k.json:images[1]"]


def test_karpathy_coco_filepath(tmp_path):
    images = [
        {"filepath": "val2014", "sentids": [1], "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
         "split": "test", "sentences": [sentence("A man with a red helmet on a small moped on a dirt road.", 1)],
         "cocoid": 391895},
        {"filepath": "train2014", "sentids": [2], "filename": "COCO_train2014_000000057870.jpg", "imgid": 1,
         "split": "restval", "sentences": [sentence("A restaurant has modern wooden tables and chairs.", 2)],
         "cocoid": 57870},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    make_images(tmp_path / "coco" / "val2014", ["COCO_val2014_000000391895.jpg"])
    make_images(tmp_path / "coco" / "train2014", ["COCO_train2014_000000057870.jpg"])
    ds = read_karpathy(tmp_path, json_file="dataset_coco.json", images_dir="coco")
    assert [(r.key, r.split) for r in ds.records] == [
        ("coco/train2014/COCO_train2014_000000057870.jpg", "train"),
        ("coco/val2014/COCO_val2014_000000391895.jpg", "test")]


def test_karpathy_bad_json_file_is_a_clear_error(tmp_path):
    (tmp_path / "dataset_flickr8k.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_karpathy(tmp_path)


# --- COCO -------------------------------------------------------------------------------------------------------------

def coco_json(path: Path, images: list[tuple[int, str]], annotations: list[tuple[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "info": {"description": "COCO 2017 Dataset"}, "licenses": [],
        "images": [{"license": 3, "file_name": f, "height": 8, "width": 8, "id": i} for i, f in images],
        "annotations": [{"image_id": i, "id": n, "caption": c} for n, (i, c) in enumerate(annotations)],
    }))


def test_coco_train_val_and_seeded_test(tmp_path):
    train = [(391895, "000000391895.jpg"), (522418, "000000522418.jpg"), (184613, "000000184613.jpg")]
    val = [(179765 + i, f"{179765 + i:012d}.jpg") for i in range(6)]
    coco_json(tmp_path / "annotations/captions_train2017.json", train + [(1, "000000000001.jpg")], [
        (391895, "A man with a red helmet on a small moped on a dirt road. "),
        (391895, "Man riding a motor bike on a dirt road on the countryside."),
        (391895, "A man with a red helmet on a small moped on a dirt road."),  # duplicate after strip
        (522418, "A woman wearing a net on her head cutting a cake. "),
        (184613, "A child holding a flowered umbrella and petting a yak."),
        (999999, "An annotation for an image that is not listed."),
        (1, "A caption for an image file that is missing."),
        (184613, "..."),
    ])
    coco_json(tmp_path / "annotations/captions_val2017.json", val,
              [(i, "A black Honda motorcycle parked in front of a garage.") for i, _ in val])
    make_images(tmp_path / "train2017", [f for _, f in train])
    make_images(tmp_path / "val2017", [f for _, f in val])
    ds = read_coco(tmp_path)
    recs = by_key(ds)
    assert recs["train2017/000000391895.jpg"].captions == [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside."]
    assert {s: n for s, (n, _) in ds.counts().items()} == {"train": 3, "val": 3, "test": 3}
    assert all(r.split in ("val", "test") for k, r in recs.items() if k.startswith("val2017/"))
    rep = ds.skipped
    train_file = "annotations/captions_train2017.json"
    assert rep.examples[F.DUPLICATE_CAPTION] == [f"{train_file}:annotations[2]"]
    assert rep.examples[F.UNKNOWN_IMAGE_ID] == [f"{train_file}:annotations[5]"]
    assert rep.examples[F.MISSING_IMAGE] == [f"{train_file}:annotations[6]"]
    assert rep.examples[F.NO_ALNUM_CAPTION] == [f"{train_file}:annotations[7]"]
    assert [r.split for r in read_coco(tmp_path).records] == [r.split for r in ds.records]
    assert any([r.split for r in read_coco(tmp_path, seed=s).records] != [r.split for r in ds.records]
               for s in range(1, 6))


def test_coco_missing_val_json_names_it(tmp_path):
    coco_json(tmp_path / "annotations/captions_train2017.json", [], [])
    with pytest.raises(DatasetError, match=r"annotations/captions_val2017\.json not found"):
        read_coco(tmp_path)


# --- a user's own CSV / JSONL -----------------------------------------------------------------------------------------

def test_csv_with_split_column(tmp_path):
    lines = [
        "image,caption,split",
        "cat.jpg,A cat sleeps on a sofa .,train",
        "cat.jpg,\"A grey cat, asleep .\",TRAIN",
        "dog.png,A dog runs .,valid",
        "owl.jpg,An owl on a branch .,dev",
        "fox.jpg,A fox in the snow .,test",
        "fox.jpg,A fox in the snow .,test",  # duplicate
        "cow.jpg,A cow .,holdout",  # unknown split
        "cat.jpg,A cat on a sofa .,val",  # the same image in a second split
    ]
    write_lines(tmp_path / "captions.csv", lines)
    make_images(tmp_path / "images", ["cat.jpg", "dog.png", "owl.jpg", "fox.jpg", "cow.jpg"])
    ds = read_csv(tmp_path)
    assert [(r.key, r.split, len(r.captions)) for r in ds.records] == [
        ("images/cat.jpg", "train", 3), ("images/dog.png", "val", 1), ("images/fox.jpg", "test", 1),
        ("images/owl.jpg", "val", 1)]
    rep = ds.skipped
    assert rep.examples[F.DUPLICATE_CAPTION] == ["captions.csv:7"]
    assert rep.examples[F.UNKNOWN_SPLIT] == ["captions.csv:8"]
    assert rep.examples[F.SPLIT_CONFLICT] == ["captions.csv:9"]


def test_csv_seeded_fractions_and_determinism(tmp_path):
    names = [f"photo_{i:03d}.jpg" for i in range(3)]
    make_images(tmp_path / "images", names)
    rows = [f"{n},A photo number {i} ." for i, n in enumerate(names)]
    write_lines(tmp_path / "captions.csv", ["image,caption"] + rows)
    ds = read_csv(tmp_path)
    assert sorted(r.split for r in ds.records) == ["test", "train", "val"]
    assert [r.split for r in read_csv(tmp_path).records] == [r.split for r in ds.records]


def test_jsonl_rows(tmp_path):
    lines = [
        json.dumps({"image": "cat.jpg", "caption": "A cat sleeps on a sofa .", "split": "train"}),
        json.dumps({"image": "cat.jpg", "caption": "A grey cat ."}),
        '{"image": "dog.png", "caption": "A dog runs .", ',  # bad JSON
        json.dumps({"image": "dog.png"}),  # no caption
        json.dumps({"image": "dog.png", "caption": "A dog runs on the beach .", "split": "validation"}),
        json.dumps({"image": "../../etc/passwd", "caption": "A secret ."}),
        json.dumps({"image": "fox.jpg", "caption": "", "split": "test"}),
    ]
    write_lines(tmp_path / "data.jsonl", lines)
    make_images(tmp_path / "pics", ["cat.jpg", "dog.png", "fox.jpg"])
    ds = read_csv(tmp_path, file="data.jsonl", images_dir="pics")
    assert [(r.key, r.split, r.captions) for r in ds.records] == [
        ("pics/cat.jpg", "train", ["A cat sleeps on a sofa .", "A grey cat ."]),
        ("pics/dog.png", "val", ["A dog runs on the beach ."])]
    rep = ds.skipped
    assert rep.examples[F.BAD_JSON_LINE] == ["data.jsonl:3"]
    assert rep.examples[F.MALFORMED_ENTRY] == ["data.jsonl:4"]
    assert rep.examples[F.ESCAPES_ROOT] == ["data.jsonl:6"]
    assert rep.examples[F.EMPTY_CAPTION] == ["data.jsonl:7"]


# --- shared helpers -----------------------------------------------------------------------------------------------

def test_decode_lines_handles_bom_crlf_utf16_and_bad_bytes():
    assert F._decode_lines(b"\xef\xbb\xbfa\r\n\r\n  b  \r\nc\xff\n") == [
        (1, "a", False), (2, "", False), (3, "b", False), (4, "c\ufffd", True), (5, "", False)]
    assert F._decode_lines("x\r\ny\n".encode("utf-16")) == [(1, "x", False), (2, "y", False), (3, "", False)]


def test_split_counts():
    assert flickr_split_counts(8091, (6000, 1000), F.FLICKR8K_IMAGES) == (6000, 1000, 1091)
    assert flickr_split_counts(7001, (6000, 1000), F.FLICKR8K_IMAGES) == (6000, 1000, 1)
    assert flickr_split_counts(31783, (29000, 1014), F.FLICKR30K_IMAGES) == (29000, 1014, 1769)
    for n in range(3, 200):
        counts = flickr_split_counts(n, (6000, 1000), F.FLICKR8K_IMAGES)
        assert sum(counts) == n and min(counts) >= 1
        counts = proportional_counts(n, (0.8, 0.1, 0.1))
        assert sum(counts) == n and min(counts) >= 1
    assert flickr_split_counts(2, (6000, 1000), F.FLICKR8K_IMAGES) == (1, 1, 0)
    assert flickr_split_counts(1, (6000, 1000), F.FLICKR8K_IMAGES) == (1, 0, 0)
    assert proportional_counts(808, (6000, 1000, 1091)) == (599, 100, 109)
    assert proportional_counts(5, (0, 0.5, 0.5))[0] == 0


def test_seeded_split_is_deterministic_and_order_independent():
    keys = [f"img{i}.jpg" for i in range(50)]
    one = seeded_split(keys, 0, (40, 5, 5))
    assert one == seeded_split(list(reversed(keys)), 0, (40, 5, 5))
    assert one != seeded_split(keys, 1, (40, 5, 5))
    assert sorted(one.values()).count("val") == 5
    with pytest.raises(ValueError):
        seeded_split(keys, 0, (1, 1, 1))


def data_readers() -> dict:
    """The reader function of each real-data config (conf/data/<name>.yaml's `data.reader._target_`)."""
    from hydra.utils import get_method

    from captioner.config import compose
    from captioner.data import is_shapes

    nodes = {name: compose([f"data={name}", "experiment=none"]).data for name in options("data")}
    return {name: get_method(node.reader._target_) for name, node in nodes.items() if not is_shapes(node)}


def test_layouts_and_registry(tmp_path):
    READERS = data_readers()
    assert set(READERS) == {"flickr8k", "flickr8k_csv", "flickr30k", "karpathy", "coco", "csv"}
    expected = {"flickr8k": "Flicker8k_Dataset/*.jpg", "flickr8k_csv": "Images/*.jpg",
                "flickr30k": "results_20130124.token", "karpathy": "dataset_flickr8k.json",
                "coco": "annotations/captions_val2017.json", "csv": "captions.csv"}
    for name, reader in READERS.items():
        assert expected[name] in describe_layout(name)
        with pytest.raises(DatasetError) as err:
            reader(tmp_path / "missing")
        assert str(tmp_path / "missing") in str(err.value) and describe_layout(name) in str(err.value)
    with pytest.raises(ValueError):
        describe_layout("imagenet")


@pytest.mark.parametrize("data", ["flickr8k_csv", "flickr30k", "coco", "csv"])
def test_the_training_seed_never_moves_the_split(data):
    """A `seed=0,1,2` sweep must evaluate on one test set: every seeded split takes data.split_seed (a constant
    of the data), never the training seed."""
    from omegaconf import OmegaConf

    from captioner.config import compose

    readers = [OmegaConf.to_container(compose([f"data={data}", f"seed={seed}"]).data, resolve=True)["reader"]
               for seed in (0, 1, 7)]
    assert readers[0] == readers[1] == readers[2] and readers[0]["seed"] == 0
    moved = OmegaConf.to_container(compose([f"data={data}", "seed=1", "data.split_seed=5"]).data, resolve=True)
    assert moved["reader"]["seed"] == 5  # the split moves only when asked, by its own key


def test_flickr30k_takes_the_karpathy_split_when_its_json_is_present(tmp_path, caplog):
    names = [f"{1000 + i}.jpg" for i in range(12)]
    touch_images(tmp_path / "flickr30k_images", names)
    write_lines(tmp_path / "results_20130124.token", [f"{n}#0\tA dog runs on the grass ." for n in names])
    with caplog.at_level("WARNING"):
        seeded = {r.key: r.split for r in read_flickr30k(tmp_path).records}
    assert "NOT the Karpathy split" in caplog.text and len(seeded) == 12
    splits = ["train"] * 6 + ["restval"] * 2 + ["val"] * 2 + ["test"]  # the last image is in no split
    entries = [{"filename": n, "split": s, "sentences": [{"raw": "ignored"}]} for n, s in zip(names, splits)]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    ds = read_flickr30k(tmp_path)
    got = {r.key: r.split for r in ds.records}
    want = {f"flickr30k_images/{n}": "train" if s == "restval" else s for n, s in zip(names, splits)}
    assert got == want
    assert ds.skipped.counts[F.NOT_IN_KARPATHY] == 1
    assert all(r.captions == ["A dog runs on the grass ."] for r in ds.records)  # captions from the token file
