"""The one record type every dataset reader yields, and the report of what a reader skipped.

Every format (Flickr8k, Flickr30k, Karpathy JSON, COCO, a user's CSV, the shapes world) is reduced to
`CaptionRecord`s, so nothing downstream (vocabulary, feature cache, DataModule) knows which format it came from.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

SPLITS = ("train", "val", "test")


class DatasetError(UserError, RuntimeError):
    """A dataset cannot be used at all (missing root, no usable image). The message says what to fix."""


@dataclass
class CaptionRecord:
    """One image with all of its reference captions.

    `image` is an absolute path inside the dataset root; `key` is the image's name relative to the root
    (stable across machines, used in caches and predictions); `split` is one of SPLITS.
    """

    image: Path
    captions: list[str]
    split: str
    key: str = ""
    meta: dict = field(default_factory=dict)  # format-specific extras (e.g. the shapes world's scene)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.image.name


@dataclass
class SkipReport:
    """Counts what a reader skipped and why, keeping the first few offending line numbers per reason.

    Real copies of caption datasets are messy (missing images, duplicate lines, bad rows); none of it may crash
    a run, but the user must see it in one summary.
    """

    source: str
    max_examples: int = 5
    counts: "OrderedDict[str, int]" = field(default_factory=OrderedDict)
    examples: "dict[str, list[str]]" = field(default_factory=dict)
    hints: "dict[str, str]" = field(default_factory=dict)  # reason -> what the user can do about it

    def skip(self, reason: str, where: str | int | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if where is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < self.max_examples:
                ex.append(str(where))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipReport") -> None:
        self.hints.update(other.hints)
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            for w in other.examples.get(reason, []):
                if len(ex) < self.max_examples:
                    ex.append(w)

    def summary(self) -> str:
        if not self.counts:
            return f"{self.source}: nothing skipped"
        lines = [f"{self.source}: skipped {self.total} item(s)"]
        for reason, n in self.counts.items():
            ex = self.examples.get(reason)
            where = f" (first at: {', '.join(ex)})" if ex else ""
            hint = f" -> {self.hints[reason]}" if reason in self.hints else ""
            lines.append(f"  - {reason}: {n}{where}{hint}")
        return "\n".join(lines)


@dataclass
class CaptionDataset:
    """What every reader returns: the records of all splits plus the skip report."""

    name: str
    root: Path
    records: list[CaptionRecord]
    skipped: SkipReport

    def split(self, name: str) -> list[CaptionRecord]:
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, tuple[int, int]]:
        """{split: (images, captions)}"""
        out = {}
        for s in SPLITS:
            recs = self.split(s)
            out[s] = (len(recs), sum(len(r.captions) for r in recs))
        return out
