"""What to check before a long run: images and captions per split, what was skipped and why, vocabulary size,
caption length percentiles, and for data=shapes the reference-agreement BLEU-4.

usage: python -m captioner.inspect [hydra overrides]
  e.g. python -m captioner.inspect data=flickr8k data.root=~/data/flickr8k
"""

from __future__ import annotations

import sys

import numpy as np
from omegaconf import DictConfig

from .config import command_main
from .data import load_dataset
from .data.vocabulary import build_vocabulary, tokenize


def inspect(cfg: DictConfig) -> int:
    dataset = load_dataset(cfg.data)
    print(f"dataset: {cfg.data.name} ({dataset.name}) at {dataset.root}")
    print(f"{'split':<6} {'images':>8} {'captions':>9} {'per image':>10}")
    for split, (n, c) in dataset.counts().items():
        print(f"{split:<6} {n:>8} {c:>9} {c / max(n, 1):>10.2f}")
    print(dataset.skipped.summary())

    train_caps = [c for r in dataset.split("train") for c in r.captions]
    vocab = build_vocabulary(train_caps, cfg.text.min_word_count)
    lengths = np.array([len(tokenize(c)) for c in train_caps]) if train_caps else np.zeros(1)
    unk = sum(t not in vocab.stoi for c in train_caps for t in tokenize(c))
    print(f"vocabulary: {len(vocab)} tokens (words seen >= {cfg.text.min_word_count} times in train, 4 specials); "
          f"{unk / max(lengths.sum(), 1):.2%} of train tokens become <unk>")
    pct = np.percentile(lengths, [5, 25, 50, 75, 95, 100])
    print("caption length (tokens), train: " + ", ".join(
        f"p{p}={v:.0f}" for p, v in zip((5, 25, 50, 75, 95, 100), pct)))
    over = int((lengths > cfg.text.max_length).sum())
    print(f"captions longer than text.max_length={cfg.text.max_length}: {over} (they will be truncated)")
    if dataset.name == "shapes":
        from .scoring.metrics import reference_agreement

        for split in ("val", "test"):
            print(f"reference agreement BLEU-4 ({split}: one reference vs the other four): "
                  f"{reference_agreement(dataset.split(split)):.3f}")
    return 0


inspect.__doc__ = __doc__


def main() -> None:
    sys.exit(command_main(inspect))


if __name__ == "__main__":
    main()
