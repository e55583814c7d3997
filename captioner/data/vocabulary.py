"""Tokenizer and Vocabulary.

One tokenizer for the model's words: building the vocabulary, encoding training targets, turning generated ids
back into text. Scores never see it: references and generated captions are both tokenised by the evaluation's
PTB tokenizer (`captioner.scoring`), as published scores are. So that a generated caption survives that second
tokenisation intact, words are cut where PTB cuts them or coarser: "t-shirt", "3.5" and "man's" stay one word here
(PTB keeps the first two whole and splits "man's" itself), punctuation is a word of its own (PTB drops it).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

PAD, SOS, EOS, UNK = "<pad>", "<sos>", "<eos>", "<unk>"
SPECIALS = (PAD, SOS, EOS, UNK)
# A vocabulary of fewer words than this describes nothing: training on it would produce garbage with exit status 0.
MIN_WORDS = 5

# A word is a number with inner separators ("3.5", "1,000", "10:30"), or a run of letters/digits with apostrophes
# or hyphens inside ("man's", "t-shirt"); every other visible character is its own token, so "dog." -> ["dog", "."]
# and "grass,running" -> ["grass", ",", "running"].
_TOKEN = re.compile(r"\d+(?:[.,:]\d+)+(?![^\W_])|[^\W_]+(?:['-][^\W_]+)*|[^\w\s]", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lowercase, NFKC-normalise, split off punctuation; tolerant of unicode and stray whitespace."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = text.replace("\u2019", "'").replace("`", "'")
    return _TOKEN.findall(text)


def normalize(text: str) -> str:
    """The whitespace-joined tokens: how the vocabulary sees a text (captions equal in this form are the same
    caption to the model)."""
    return " ".join(tokenize(text))


class Vocabulary:
    """Word <-> index map with `<pad>`=0, `<sos>`=1, `<eos>`=2, `<unk>`=3."""

    def __init__(self, words: Sequence[str] = ()) -> None:
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    pad_id, sos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        """Build from (training-split) captions, keeping words seen at least `min_count` times.

        Words are ordered by descending count, ties alphabetically, so the same captions give the same ids.
        """
        return cls.from_counts(Counter(tok for c in captions for tok in tokenize(c)), min_count)

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int) -> "Vocabulary":
        return cls(sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)))

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Text -> ids wrapped in <sos> ... <eos>. `max_length` caps the number of word tokens."""
        ids = [self.stoi.get(t, self.unk_id) for t in tokenize(text)]
        if max_length is not None:
            ids = ids[:max_length]
        return [self.sos_id, *ids, self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; stops at the first <eos>, drops <pad>/<sos>/<eos> (keeps <unk> visible)."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.sos_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        itos = list(d["itos"])
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {itos[:4]}")
        return cls(itos[4:])

    def save(self, path: str | Path) -> None:
        """Whole or not at all, and never through a link planted at `path` (the link is replaced)."""
        from ..files import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_dict(json.loads(Path(path).read_text()))


def build_vocabulary(captions: Iterable[str], min_count: int, source: str = "the train split") -> Vocabulary:
    """`Vocabulary.build`, refusing a vocabulary of fewer than MIN_WORDS words: a `text.min_word_count` too high
    for the data is a ConfigError saying which values work; data with too few distinct words a DatasetError."""
    from ..errors import ConfigError
    from .records import DatasetError

    if min_count < 1:
        raise ConfigError(f"text.min_word_count={min_count}: must be 1 or more (words seen at least this often in "
                          "train are kept; the research codebases use 5)")
    counts = Counter(tok for c in captions for tok in tokenize(c))
    vocab = Vocabulary.from_counts(counts, min_count)
    words = len(vocab) - len(SPECIALS)
    if words >= MIN_WORDS:
        return vocab
    if len(counts) < MIN_WORDS:
        raise DatasetError(f"{source} has {len(counts)} distinct word(s) in its captions ({', '.join(sorted(counts))})"
                           f": a caption vocabulary needs at least {MIN_WORDS}. Add training captions (or check that "
                           "the caption column holds the captions)")
    top, most = counts.most_common(1)[0]
    allowed = sorted(counts.values(), reverse=True)[MIN_WORDS - 1]
    raise ConfigError(
        f"text.min_word_count={min_count} leaves {words} word(s) in the vocabulary besides {' '.join(SPECIALS)}: "
        f"the most frequent word of {source} ('{top}') occurs {most} time(s). Use text.min_word_count between 1 and "
        f"{allowed} (keeps at least {MIN_WORDS} words; the research codebases use 5 on Flickr/COCO)")


def encode_captions(vocab: Vocabulary, captions: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Encode many captions; returns (ids, number of captions truncated to `max_length` words)."""
    out, truncated = [], 0
    for c in captions:
        n = len(tokenize(c))
        truncated += n > max_length
        out.append(vocab.encode(c, max_length))
    return out, truncated
