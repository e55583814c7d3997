"""Readers for the caption dataset formats users actually have.

Flickr8k (original release and the common CSV copy), Flickr30k (token file or `|` CSV copy), Karpathy split JSON,
COCO captions JSON and a user's own CSV/JSONL all come out as one `CaptionDataset`: `CaptionRecord`s sorted by key
plus a `SkipReport`. Real copies of these datasets are messy (missing images, duplicated or broken lines, odd
encodings), so nothing inside a file may crash a read: every problem is skipped and counted with its `file:line`,
and the summary says what to do about each kind (`SKIP_HINTS`). Image names from dataset files never leave the
dataset root (`../../etc/passwd` or an absolute path is refused and counted).
Only a dataset that cannot be used at all (no root, no annotation file, no usable image) raises `DatasetError`,
and its message shows the layout the reader expected.

The readers share one helper per job, so a quirk is handled the same way in every format:
  _decode_lines   bytes -> numbered text lines (BOM, CRLF, UTF-16, non-UTF-8 bytes)
  _Source.image   an annotation's image name -> (key, path), refusing root escapes and missing files
  _Groups         captions grouped per image, with caption checks and de-duplication
  seeded_split    deterministic train/val/test assignment (sizes from `flickr_split_counts`/`proportional_counts`)
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from captioner.data.records import SPLITS, CaptionDataset, CaptionRecord, DatasetError, SkipReport

log = logging.getLogger(__name__)

# --- skip reasons (one string each, so the summary groups them and tests can name them) -------------------------
MISSING_IMAGE = "image file missing"
ESCAPES_ROOT = "path escapes dataset root"
EMPTY_IMAGE_NAME = "empty image name"
DUPLICATE_CAPTION = "duplicate caption for image"
EMPTY_CAPTION = "empty caption"
NO_ALNUM_CAPTION = "caption has no letter or digit"
WRONG_FIELDS = "wrong number of fields"
BAD_NAME_K = "malformed image#k field"
BAD_JSON_LINE = "bad JSON line"
MALFORMED_ENTRY = "malformed entry"
BAD_BYTES = "non-UTF-8 bytes replaced (line kept)"
NO_SPLIT = "image in no split list"
LISTED_WITHOUT_CAPTIONS = "split-list image has no usable caption"
LISTED_TWICE = "image listed twice in split lists"
SPLIT_CONFLICT = "image in two splits (first kept)"
UNKNOWN_SPLIT = "unknown split value"
RESTVAL_DROPPED = "restval image dropped"
NOT_IN_KARPATHY = "image not in the Karpathy split JSON"
UNKNOWN_IMAGE_ID = "annotation for unknown image_id"
DUPLICATE_IMAGE_ID = "duplicate image id"
IMAGE_WITHOUT_CAPTIONS = "image has no captions"

# What the user can do about each, shown after the reason in the summary (the skipped lines are never fatal).
SKIP_HINTS = {
    MISSING_IMAGE: "check data.root and the image folder (data.reader.images_dir), or restore the files",
    ESCAPES_ROOT: "image names must be relative paths inside the dataset root; fix or remove these lines",
    EMPTY_IMAGE_NAME: "the line names no image; fix or remove it",
    DUPLICATE_CAPTION: "harmless: the repeat is dropped",
    EMPTY_CAPTION: "the line has no caption text; fix or remove it",
    NO_ALNUM_CAPTION: "a caption of only punctuation teaches nothing; fix or remove it",
    WRONG_FIELDS: "check the separator (TAB, comma or |) and the quoting of these lines",
    BAD_NAME_K: "expected <image>#<k> before the TAB",
    BAD_JSON_LINE: "each line must be one JSON object",
    MALFORMED_ENTRY: "fields missing or of the wrong type; compare with the expected layout",
    BAD_BYTES: "the file is not UTF-8 (a Latin-1 copy?); re-save it as UTF-8 to get these characters right",
    NO_SPLIT: "add these images to a split list if you want them",
    LISTED_WITHOUT_CAPTIONS: "the split list names an image with no usable caption (not in the caption file, or its "
                             "image file or captions were skipped)",
    LISTED_TWICE: "harmless: the repeat is dropped",
    SPLIT_CONFLICT: "give each image one split; the first one stated is used",
    UNKNOWN_SPLIT: "use train, val (valid, validation, dev) or test",
    RESTVAL_DROPPED: "set data.reader.restval=train to use these images",
    NOT_IN_KARPATHY: "the Karpathy split leaves these images out, and so do the published scores",
    UNKNOWN_IMAGE_ID: "the annotation's image_id is not in the images list",
    DUPLICATE_IMAGE_ID: "the first entry with this id is used",
    IMAGE_WITHOUT_CAPTIONS: "harmless: an image without annotations is left out",
}

FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Image counts of the full releases; seeded splits of smaller copies keep the full-size train/val/test ratio.
FLICKR8K_IMAGES = 8091  # 6000 / 1000 / 1091
FLICKR30K_IMAGES = 31014  # 29000 / 1014 / 1000 (the Karpathy split sizes)

# Split names users write in their own files.
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


# --- expected layouts (shown in every hard error) -----------------------------------------------------------------

_LAYOUT_DEFAULTS: dict[str, dict] = {
    "flickr8k": {"token_file": "Flickr8k.token.txt", "images_dir": "Flicker8k_Dataset",
                 "split_files": FLICKR8K_SPLIT_FILES},
    "flickr8k_csv": {"captions_file": "captions.txt", "images_dir": "Images", "split_files": None},
    "flickr30k": {"captions_file": "results_20130124.token", "images_dir": "flickr30k_images"},
    "karpathy": {"json_file": "dataset_flickr8k.json", "images_dir": ""},
    "coco": {"train_json": "annotations/captions_train2017.json", "val_json": "annotations/captions_val2017.json",
             "train_images": "train2017", "val_images": "val2017"},
    "csv": {"file": "captions.csv", "images_dir": "images"},
}


def describe_layout(format_name: str) -> str:
    """The folder layout a reader expects, as a small tree with the real-world default file names."""
    return _layout(format_name)


def _layout(fmt: str, **names) -> str:
    """`describe_layout` with the file names a caller actually passed (so an error shows what was looked for)."""
    fmt = fmt.lower()
    if fmt not in _LAYOUT_DEFAULTS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(_LAYOUT_DEFAULTS)}")
    n = {**_LAYOUT_DEFAULTS[fmt], **{k: v for k, v in names.items() if v is not None}}

    def under(folder: str, pattern: str) -> str:
        return f"{folder.rstrip('/')}/{pattern}" if folder else pattern

    def split_rows(split_files: Mapping[str, str] | None) -> list[tuple[str, str]]:
        return [(path, f"{split} image names, one a line") for split, path in (split_files or {}).items()]

    if fmt == "flickr8k":
        rows = [(n["token_file"], "<image>.jpg#<k><TAB><caption>, one caption a line")]
        rows += split_rows(n["split_files"]) + [(under(n["images_dir"], "*.jpg"), "the images")]
    elif fmt == "flickr8k_csv":
        rows = [(n["captions_file"], "CSV, header image,caption")]
        rows += split_rows(n["split_files"]) + [(under(n["images_dir"], "*.jpg"), "the images")]
    elif fmt == "flickr30k":
        rows = [(n["captions_file"], "<image>.jpg#<k><TAB><caption>  or  image_name| comment_number| comment"),
                (under(n["images_dir"], "*.jpg"), "the images")]
    elif fmt == "karpathy":
        rows = [(n["json_file"], '{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}'),
                (under(n["images_dir"], "[<filepath>/]<filename>"), "the images")]
    elif fmt == "coco":
        rows = [(n["train_json"], '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}'),
                (n["val_json"], "same shape; its images are split by seed into val and test"),
                (under(n["train_images"], "*.jpg"), "train images"),
                (under(n["val_images"], "*.jpg"), "val images")]
    else:  # csv
        rows = [(n["file"], 'CSV, header image,caption[,split]  (or .jsonl: {"image", "caption", "split"?})'),
                (under(n["images_dir"], "<image>"), "the images")]
    width = max(len(path) for path, _ in rows)
    return "\n".join(["<root>/"] + [f"  {path.ljust(width)}  {what}" for path, what in rows])


# --- helper 1: bytes -> lines -------------------------------------------------------------------------------------

def _decode_lines(data: bytes) -> list[tuple[int, str, bool]]:
    """(1-based line number, stripped text, had non-UTF-8 bytes) for every line, blank ones included.

    Bytes are split into lines before decoding (a newline byte never occurs inside a UTF-8 sequence), so a bad
    byte only marks its own line and is replaced rather than failing the file. A UTF-8 BOM, CRLF endings and
    trailing whitespace vanish; a UTF-16 file (Windows "Unicode" save) is decoded as such instead of as garbage.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16", errors="replace")
        raw = [(line, "\ufffd" in line) for line in text.split("\n")]
    else:
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
        raw = []
        for line in data.split(b"\n"):
            try:
                raw.append((line.decode("utf-8"), False))
            except UnicodeDecodeError:
                raw.append((line.decode("utf-8", errors="replace"), True))
    # A BOM can also start a later line when copies were concatenated; str.strip() does not remove it.
    return [(i, text.strip().lstrip("\ufeff").strip(), bad) for i, (text, bad) in enumerate(raw, start=1)]


# --- helper 2: the dataset root, its report and safe image paths --------------------------------------------------

def _relative_key(root: Path, parts: Sequence[str]) -> tuple[str | None, str | None]:
    """(posix path of `root/parts...` relative to `root`, None), or (None, skip reason) for an empty or escaping name.

    Normalised lexically ("a/../b" -> "b") instead of with Path.resolve(): resolving follows symlinks, and a dataset
    whose images are symlinks (git-annex, DVC, an Images/ folder linked from a shared disk) would look like one big
    escape. `root` itself is resolved once by _Source, so keys and paths are stable. An absolute name in a caption
    file makes os.path.join drop the root, so "/etc/passwd" is refused like "../../etc/passwd".
    """
    if not parts[-1]:
        return None, EMPTY_IMAGE_NAME
    candidate = Path(os.path.normpath(os.path.join(root, *parts)))
    if not candidate.is_relative_to(root):
        return None, ESCAPES_ROOT
    return candidate.relative_to(root).as_posix(), None


class _Source:
    """One read: the resolved dataset root, its skip report, and checked access to the files under it."""

    def __init__(self, fmt: str, root: str | os.PathLike, **names) -> None:
        self.fmt = fmt
        self.layout = _layout(fmt, **names)
        given = Path(root).expanduser()
        if not given.is_dir():
            what = "is not a folder" if given.exists() else "does not exist"
            raise DatasetError(f"{fmt} dataset root {what}: {given}\nExpected layout:\n{self.layout}")
        self.root = given.resolve()
        self.report = SkipReport(f"{fmt} ({self.root})", hints=SKIP_HINTS)
        self._located: dict[tuple[str, ...], tuple[str, Path] | str] = {}

    def file(self, rel: str) -> Path:
        """A required annotation file; its absence is a hard error naming it and the layout."""
        path = self.root / rel
        if not path.is_file():
            raise DatasetError(f"{self.fmt}: required file {rel} not found in {self.root}\n"
                               f"Expected layout:\n{self.layout}")
        return path

    def _decoded(self, rel: str) -> list[tuple[int, str, bool]]:
        try:
            data = self.file(rel).read_bytes()
        except OSError as e:
            raise DatasetError(f"{self.fmt}: cannot read {self.root / rel}: {e}") from e
        decoded = _decode_lines(data)
        for lineno, _, bad in decoded:
            if bad:  # kept (the rest of the caption is usable) but reported, it usually means a Latin-1 copy
                self.report.skip(BAD_BYTES, f"{rel}:{lineno}")
        return decoded

    def lines(self, rel: str) -> list[tuple[str, str]]:
        """Non-blank lines of a text file as (`file:line`, text); blank lines are dropped without a count."""
        return [(f"{rel}:{lineno}", text) for lineno, text, _ in self._decoded(rel) if text]

    def json(self, rel: str):
        text = "\n".join(text for _, text, _ in self._decoded(rel))  # all lines, so JSON error positions match
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.fmt}: {self.root / rel} is not valid JSON ({e})\n"
                               f"Expected layout:\n{self.layout}") from e

    def key(self, *parts: str, where: str) -> str | None:
        """The posix path of `root/parts...` relative to the root, or None (counted) if it leaves the root."""
        key, reason = _relative_key(self.root, parts)
        if reason is not None:
            self.report.skip(reason, where)
        return key

    def image(self, *parts: str, where: str) -> tuple[str, Path] | None:
        """(key, absolute path) of an existing image file inside the root, or None with the reason counted.

        Cached per name: caption files repeat each image name ~5 times and the filesystem is asked once.
        """
        found = self._located.get(parts)
        if found is None:
            found = self._located[parts] = self._locate(parts)
        if isinstance(found, str):
            self.report.skip(found, where)
            return None
        return found

    def _locate(self, parts: tuple[str, ...]) -> tuple[str, Path] | str:
        key, reason = _relative_key(self.root, parts)
        if reason is not None:
            return reason
        path = self.root / key
        try:
            exists = path.is_file()
        except (OSError, ValueError):  # e.g. a name too long for the filesystem
            exists = False
        return (key, path) if exists else MISSING_IMAGE

    def finish(self, groups: "_Groups", split_of: Mapping[str, str],
               unsplit_reason: str = NO_SPLIT) -> CaptionDataset:
        """Records sorted by key; an image with captions but no split is counted under `unsplit_reason`."""
        records = []
        for key in sorted(groups.captions):
            split = split_of.get(key)
            if split is None:
                self.report.skip(unsplit_reason, key)
                continue
            records.append(CaptionRecord(image=groups.paths[key], captions=groups.captions[key], split=split,
                                         key=key))
        if not records:
            raise DatasetError(f"{self.fmt}: no usable image in {self.root}\n{self.report.summary()}\n"
                               f"Expected layout:\n{self.layout}")
        return CaptionDataset(self.fmt, self.root, records, self.report)


# --- helper 3: captions grouped per image -------------------------------------------------------------------------

class _Groups:
    """Captions grouped per image key in file order, each caption checked, (image, caption) pairs de-duplicated.

    A group only exists once a caption was accepted, so an image whose every caption was dropped is never emitted.
    Any number of captions per image is fine (real copies have 1 to 6, not always 5).
    """

    def __init__(self, report: SkipReport) -> None:
        self.report = report
        self.paths: dict[str, Path] = {}
        self.captions: dict[str, list[str]] = {}
        self.split: dict[str, str] = {}  # explicit split per key, where the format states one
        self._seen: dict[str, set[str]] = {}

    def add(self, image: tuple[str, Path] | None, caption, where: str) -> None:
        if image is None:  # already counted by _Source.image
            return
        if not isinstance(caption, str):
            self.report.skip(MALFORMED_ENTRY, where)
            return
        caption = caption.strip()
        if not caption:
            self.report.skip(EMPTY_CAPTION, where)
            return
        if not any(ch.isalnum() for ch in caption):  # "." or "-" rows: nothing to learn, would pollute BLEU refs
            self.report.skip(NO_ALNUM_CAPTION, where)
            return
        key, path = image
        seen = self._seen.setdefault(key, set())
        norm = " ".join(caption.split())  # "a  dog ." repeats "a dog ." as far as any metric can tell
        if norm in seen:
            self.report.skip(DUPLICATE_CAPTION, where)
            return
        seen.add(norm)
        self.paths[key] = path
        self.captions.setdefault(key, []).append(caption)

    def assign(self, key: str, split: str, where: str) -> None:
        """Record an explicit split; an image cannot be in two splits, the first one stated wins."""
        if self.split.setdefault(key, split) != split:
            self.report.skip(SPLIT_CONFLICT, where)

    def unassigned(self) -> list[str]:
        return [key for key in self.captions if key not in self.split]


# --- helper 4: seeded splitting -----------------------------------------------------------------------------------

def proportional_counts(n: int, weights: Sequence[float]) -> tuple[int, int, int]:
    """Split n items into (train, val, test) counts proportional to `weights`, summing to n.

    Largest-remainder rounding, then every split with a positive weight gets at least one item while the largest
    split can spare one (so with >= 3 items and three positive weights no split is empty).
    """
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need three non-negative split weights, got {tuple(weights)}")
    total = float(sum(weights))
    exact = [n * w / total for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(3), key=lambda i: -(exact[i] - counts[i]))  # stable: ties go train, val, test
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if weights[i] > 0 and counts[i] == 0:
            donor = max(range(3), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts[0], counts[1], counts[2]


def flickr_split_counts(n: int, split_sizes: Sequence[int], full_size: int) -> tuple[int, int, int]:
    """The Flickr rule: `split_sizes` (train, val) images and the rest test when the copy is big enough;
    otherwise the sizes shrink in the full release's ratio (train, val, full_size - train - val)."""
    n_train, n_val = split_sizes
    if n > n_train + n_val:
        return n_train, n_val, n - n_train - n_val
    return proportional_counts(n, (n_train, n_val, max(full_size - n_train - n_val, 1)))


def seeded_split(keys: Iterable[str], seed: int, counts: Sequence[int]) -> dict[str, str]:
    """{key: split}: the sorted keys shuffled with random.Random(seed), then cut into (train, val, test) counts.

    Sorting first makes the result independent of file order; the same seed gives the same split on any machine.
    """
    order = sorted(keys)
    if sum(counts) != len(order):
        raise ValueError(f"split counts {tuple(counts)} do not add up to {len(order)} images")
    random.Random(seed).shuffle(order)
    cut_val, cut_test = counts[0], counts[0] + counts[1]
    return {key: "train" if i < cut_val else "val" if i < cut_test else "test" for i, key in enumerate(order)}


# --- row parsers ----------------------------------------------------------------------------------------------------

def _comma_fields(text: str) -> list[str]:
    # One line at a time: a stray quote then damages only its own row, instead of the csv module swallowing
    # every following line into one field looking for the closing quote.
    try:
        return next(csv.reader([text]))
    except (csv.Error, StopIteration):
        return []


def _pipe_fields(text: str) -> list[str]:
    # Not the csv module: the Flickr30k copy does not quote, and a caption starting with '"' would be mangled.
    return text.split("|")


def _table_rows(report: SkipReport, lines: list[tuple[str, str]], columns: Sequence[str],
                optional: Sequence[str] = (), fields: Callable[[str], list[str]] = _comma_fields,
                ) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a delimited caption table as {column: stripped value}.

    With a header (it names every required column) columns are matched by name, in any order, extra columns
    ignored; without one, by position. Rows with the wrong number of fields are counted; a repeated header
    (concatenated copies) is dropped like a blank line.
    """
    header: list[str] | None = None
    if lines:
        first = [f.strip().lower() for f in fields(lines[0][1])]
        if set(columns) <= set(first):
            header = first
            lines = lines[1:]
    for where, text in lines:
        values = [f.strip() for f in fields(text)]
        if header is not None:
            if [v.lower() for v in values] == header:
                continue
            if len(values) != len(header):
                report.skip(WRONG_FIELDS, where)
                continue
            yield where, dict(zip(header, values))
        elif len(values) in (len(columns), len(columns) + len(optional)):
            yield where, dict(zip([*columns, *optional], values))
        else:
            report.skip(WRONG_FIELDS, where)


def _token_rows(report: SkipReport, lines: list[tuple[str, str]]) -> Iterator[tuple[str, dict[str, str]]]:
    """`<image>#<k><TAB><caption>` lines (Flickr8k/Flickr30k token files) as {"image", "caption"}."""
    for where, text in lines:
        parts = text.split("\t")
        if len(parts) == 1:
            # Copies whose tab became spaces: accept only when the first word is clearly a `name#k` field.
            head, _, rest = text.partition(" ")
            name, hash_, k = head.rpartition("#")
            if hash_ and name and k.isdigit():
                parts = [head, rest]
        if len(parts) != 2:
            report.skip(WRONG_FIELDS, where)
            continue
        name, hash_, k = parts[0].strip().rpartition("#")
        if not (hash_ and name and k.isdigit()):
            report.skip(BAD_NAME_K, where)
            continue
        yield where, {"image": name, "caption": parts[1]}


def _jsonl_rows(report: SkipReport, lines: list[tuple[str, str]]) -> Iterator[tuple[str, dict[str, str]]]:
    """`{"image": ..., "caption": ..., "split"?: ...}` lines as {"image", "caption", "split"}."""
    for where, text in lines:
        try:
            obj = json.loads(text)
        except ValueError:
            report.skip(BAD_JSON_LINE, where)
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("image"), str) and isinstance(obj.get("caption"), str)):
            report.skip(MALFORMED_ENTRY, where)
            continue
        split = obj.get("split")
        yield where, {"image": obj["image"], "caption": obj["caption"],
                      "split": "" if split is None else str(split)}


def _split_lists(src: _Source, groups: _Groups, split_files: Mapping[str, str], images_dir: str) -> dict[str, str]:
    """Official split lists (one image name a line) -> {key: split}; every list file is required.

    Listed names that match no image with a usable caption are counted, so a truncated token file shows up.
    """
    split_of: dict[str, str] = {}
    for split, rel in split_files.items():
        if split not in SPLITS:
            raise ValueError(f"split_files keys must be among {SPLITS}, got {split!r}")
        for where, name in src.lines(rel):
            key = src.key(images_dir, name, where=where)
            if key is None:
                continue
            if key in split_of:
                src.report.skip(LISTED_TWICE if split_of[key] == split else SPLIT_CONFLICT, where)
                continue
            split_of[key] = split
            if key not in groups.captions:
                src.report.skip(LISTED_WITHOUT_CAPTIONS, where)
    return split_of


def _add_rows(src: _Source, groups: _Groups, rows: Iterable[tuple[str, dict[str, str]]], images_dir: str,
              image_col: str = "image", caption_col: str = "caption") -> None:
    for where, row in rows:
        groups.add(src.image(images_dir, row[image_col], where=where), row[caption_col], where)


# --- readers --------------------------------------------------------------------------------------------------------

def read_flickr8k(root, token_file: str = "Flickr8k.token.txt", images_dir: str = "Flicker8k_Dataset",
                  split_files: Mapping[str, str] | None = None) -> CaptionDataset:
    """The original Flickr8k release: token file plus the official train/dev/test lists."""
    split_files = dict(FLICKR8K_SPLIT_FILES if split_files is None else split_files)
    src = _Source("flickr8k", root, token_file=token_file, images_dir=images_dir, split_files=split_files)
    groups = _Groups(src.report)
    _add_rows(src, groups, _token_rows(src.report, src.lines(token_file)), images_dir)
    return src.finish(groups, _split_lists(src, groups, split_files, images_dir))


def read_flickr8k_csv(root, captions_file: str = "captions.txt", images_dir: str = "Images",
                      split_files: Mapping[str, str] | None = None, seed: int = 0,
                      split_sizes: tuple[int, int] = (6000, 1000)) -> CaptionDataset:
    """The common Flickr8k CSV copy (`image,caption`); official split lists if given, else a seeded split."""
    src = _Source("flickr8k_csv", root, captions_file=captions_file, images_dir=images_dir, split_files=split_files)
    groups = _Groups(src.report)
    _add_rows(src, groups, _table_rows(src.report, src.lines(captions_file), ("image", "caption")), images_dir)
    if split_files is not None:
        return src.finish(groups, _split_lists(src, groups, split_files, images_dir))
    counts = flickr_split_counts(len(groups.captions), split_sizes, FLICKR8K_IMAGES)
    return src.finish(groups, seeded_split(groups.captions, seed, counts))


def read_flickr30k(root, captions_file: str = "results_20130124.token", images_dir: str = "flickr30k_images",
                   seed: int = 0, split_sizes: tuple[int, int] = (29000, 1014),
                   karpathy_json: str | None = "dataset_flickr30k.json") -> CaptionDataset:
    """Flickr30k from the token file, its `image_name| comment_number| comment` copy or an `image,caption` CSV
    copy (detected from the first line). The split is Karpathy's (the one published scores use) when
    `karpathy_json` is in the root, else a seeded split of the same sizes, with a warning saying so."""
    src = _Source("flickr30k", root, captions_file=captions_file, images_dir=images_dir)
    lines = src.lines(captions_file)
    first = lines[0][1] if lines else ""
    groups = _Groups(src.report)
    if "|" in first and "\t" not in first:
        rows = _table_rows(src.report, lines, ("image_name", "comment_number", "comment"), fields=_pipe_fields)
        _add_rows(src, groups, rows, images_dir, image_col="image_name", caption_col="comment")
    elif "\t" not in first and [f.strip().lower() for f in _comma_fields(first)] == ["image", "caption"]:
        _add_rows(src, groups, _table_rows(src.report, lines, ("image", "caption")), images_dir)
    else:
        _add_rows(src, groups, _token_rows(src.report, lines), images_dir)
    if karpathy_json is not None and (src.root / karpathy_json).is_file():
        log.info("flickr30k: Karpathy split from %s", src.root / karpathy_json)
        return src.finish(groups, _karpathy_splits(src, karpathy_json, images_dir), unsplit_reason=NOT_IN_KARPATHY)
    log.warning("flickr30k: no %s in %s, so the split is a seeded %d/%d/rest one (split_seed=%d), NOT the Karpathy "
                "split that published Flickr30k scores use: put Karpathy's dataset_flickr30k.json there to compare "
                "with papers", karpathy_json, src.root, *split_sizes, seed)
    counts = flickr_split_counts(len(groups.captions), split_sizes, FLICKR30K_IMAGES)
    return src.finish(groups, seeded_split(groups.captions, seed, counts))


def _karpathy_splits(src: _Source, json_file: str, images_dir: str) -> dict[str, str]:
    """{key: split} of a Karpathy split JSON's entries (restval -> train, as the papers train); its sentences are
    not read (the captions come from the caption file)."""
    data = src.json(json_file)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f'{src.fmt}: {src.root / json_file} has no "images" list (a Karpathy split JSON)')
    split_of: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{json_file}:images[{i}]"
        stated = entry.get("split") if isinstance(entry, dict) else None
        split = "train" if stated == "restval" else _SPLIT_ALIASES.get(stated) if isinstance(stated, str) else None
        if split is None or not isinstance(entry.get("filename"), str):
            src.report.skip(MALFORMED_ENTRY, where)
            continue
        key = src.key(images_dir, entry["filename"], where=where)
        if key is not None:
            split_of[key] = split
    return split_of


def _sentence_text(sentence):
    """A Karpathy sentence's `raw` text, or its tokens joined when `raw` is missing or empty."""
    if isinstance(sentence, str):
        return sentence
    if not isinstance(sentence, dict):
        return None
    raw = sentence.get("raw")
    if isinstance(raw, str) and raw.strip():
        return raw
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens)
    return raw if isinstance(raw, str) else None


def read_karpathy(root, json_file: str = "dataset_flickr8k.json", images_dir: str = "",
                  restval: str | None = "train") -> CaptionDataset:
    """Karpathy split JSON (Flickr8k/30k/COCO); `restval` images go to that split, or are dropped with None."""
    if restval is not None and restval not in SPLITS:
        raise ValueError(f"restval must be one of {SPLITS} or None, got {restval!r}")
    src = _Source("karpathy", root, json_file=json_file, images_dir=images_dir)
    data = src.json(json_file)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f'karpathy: {src.root / json_file} has no "images" list\nExpected layout:\n{src.layout}')
    groups = _Groups(src.report)
    for i, entry in enumerate(entries):
        where = f"{json_file}:images[{i}]"
        if not (isinstance(entry, dict) and isinstance(entry.get("filename"), str)
                and isinstance(entry.get("filepath") or "", str) and isinstance(entry.get("sentences"), list)):
            src.report.skip(MALFORMED_ENTRY, where)
            continue
        stated = entry.get("split")
        split = restval if stated == "restval" else _SPLIT_ALIASES.get(stated) if isinstance(stated, str) else None
        if split is None:
            src.report.skip(RESTVAL_DROPPED if stated == "restval" else UNKNOWN_SPLIT, where)
            continue
        image = src.image(images_dir, entry.get("filepath") or "", entry["filename"], where=where)
        if image is None:  # counted once per entry, not once per sentence
            continue
        for j, sentence in enumerate(entry["sentences"]):
            groups.add(image, _sentence_text(sentence), f"{where}.sentences[{j}]")
        groups.assign(image[0], split, where)
    return src.finish(groups, groups.split)


def read_coco(root, train_json: str = "annotations/captions_train2017.json",
              val_json: str = "annotations/captions_val2017.json", train_images: str = "train2017",
              val_images: str = "val2017", seed: int = 0, val_fraction: float = 0.5) -> CaptionDataset:
    """COCO captions: train2017 -> train; val2017 split by seed into val (`val_fraction`) and test.

    Pass `train_json=None` or `val_json=None` to read only one of the two files.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    src = _Source("coco", root, train_json=train_json, val_json=val_json, train_images=train_images,
                  val_images=val_images)
    groups = _Groups(src.report)
    for rel, images_dir, split in ((train_json, train_images, "train"), (val_json, val_images, None)):
        if rel is None:
            continue
        data = src.json(rel)
        if not (isinstance(data, dict) and isinstance(data.get("images"), list)
                and isinstance(data.get("annotations"), list)):
            raise DatasetError(f'coco: {src.root / rel} needs "images" and "annotations" lists\n'
                               f"Expected layout:\n{src.layout}")
        file_of: dict[int | str, str] = {}
        for i, entry in enumerate(data["images"]):
            where = f"{rel}:images[{i}]"
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), (int, str))
                    and isinstance(entry.get("file_name"), str)):
                src.report.skip(MALFORMED_ENTRY, where)
            elif entry["id"] in file_of:
                src.report.skip(DUPLICATE_IMAGE_ID, where)
            else:
                file_of[entry["id"]] = entry["file_name"]
        captioned = set()
        for i, ann in enumerate(data["annotations"]):
            where = f"{rel}:annotations[{i}]"
            if not isinstance(ann, dict):
                src.report.skip(MALFORMED_ENTRY, where)
                continue
            image_id = ann.get("image_id")
            if not isinstance(image_id, (int, str)) or image_id not in file_of:
                src.report.skip(UNKNOWN_IMAGE_ID, where)
                continue
            captioned.add(image_id)
            image = src.image(images_dir, file_of[image_id], where=where)
            groups.add(image, ann.get("caption"), where)
            if image is not None and split is not None:
                groups.assign(image[0], split, where)
        for image_id in file_of:
            if image_id not in captioned:
                src.report.skip(IMAGE_WITHOUT_CAPTIONS, f"{rel}:image id {image_id}")
    val_keys = groups.unassigned()  # val2017 images (train ones were assigned above)
    counts = proportional_counts(len(val_keys), (0.0, val_fraction, 1.0 - val_fraction))
    return src.finish(groups, {**seeded_split(val_keys, seed, counts), **groups.split})


def read_csv(root, file: str = "captions.csv", images_dir: str = "images", seed: int = 0,
             val_fraction: float = 0.1, test_fraction: float = 0.1) -> CaptionDataset:
    """A user's own images: CSV `image,caption[,split]` or JSONL (by the `.jsonl` extension), rows grouped per image.

    An image takes the split its rows state (train, val/valid/validation/dev, test); images whose rows state none
    are split by seed with the given fractions.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"need val_fraction, test_fraction >= 0 with sum <= 1, got {val_fraction}, {test_fraction}")
    src = _Source("csv", root, file=file, images_dir=images_dir)
    lines = src.lines(file)
    if file.lower().endswith(".jsonl"):
        rows = _jsonl_rows(src.report, lines)
    else:
        rows = _table_rows(src.report, lines, ("image", "caption"), optional=("split",))
    groups = _Groups(src.report)
    for where, row in rows:
        stated = row.get("split", "").strip().lower()
        split = _SPLIT_ALIASES.get(stated) if stated else None
        if stated and split is None:
            src.report.skip(UNKNOWN_SPLIT, where)
            continue
        image = src.image(images_dir, row["image"], where=where)
        groups.add(image, row["caption"], where)
        if image is not None and split is not None:
            groups.assign(image[0], split, where)
    rest = groups.unassigned()
    counts = proportional_counts(len(rest), (1.0 - val_fraction - test_fraction, val_fraction, test_fraction))
    return src.finish(groups, {**seeded_split(rest, seed, counts), **groups.split})
