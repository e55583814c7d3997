"""CIDEr-D, one implementation for the test metric and the self-critical reward.

pycocoevalcap's `Cider` (the metric papers print as CIDEr, which is CIDEr-D: clipped n-gram counts and a Gaussian
penalty on the length difference, x10) takes its document frequencies from the references of the very set it
scores. Self-critical training rewards sampled captions of training images, and the research code
(ImageCaptioning.pytorch's CiderD) takes the document frequencies once from the TRAINING references instead, so
that a reward does not depend on which images share a batch. `CiderD` does both from one code path:

  CiderD(corpus)                       document frequencies and log(number of images) from `corpus` (tokenised
                                       references, one list per image)
  scorer.reference_vectors(refs)       an image's references as tf-idf vectors, computed once and reused
  scorer.score(candidate, vectors)     one caption's CIDEr-D against them
  cider_d(hypotheses, references)      corpus CIDEr-D as pycocoevalcap computes it (document frequencies from these
                                       references): the mean and the per-image scores

The arithmetic is pycocoevalcap's `CiderScorer`, quirks included (the length compared is the number of bigrams;
n-grams absent from the corpus get document frequency 1); the tests hold `cider_d` equal to it.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

NGRAMS, SIGMA = 4, 6.0


def ngram_counts(text: str, n: int = NGRAMS) -> Counter:
    """Counts of every 1..n-gram of a tokenised (space-separated) text."""
    words = text.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D with the document frequencies of a reference corpus (see the module docstring)."""

    def __init__(self, corpus: Sequence[Sequence[str]], n: int = NGRAMS, sigma: float = SIGMA) -> None:
        if not corpus:
            raise ValueError("CIDEr-D needs a reference corpus of at least one image")
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter = Counter()
        for refs in corpus:
            self.document_frequency.update({g for ref in refs for g in ngram_counts(ref, n)})
        self.log_images = math.log(float(len(corpus)))

    def vector(self, text: str) -> tuple[dict, list[float], int]:
        """tf-idf weight of each n-gram, the norm per n-gram order, and the length CIDEr-D compares (bigrams)."""
        vec, norm, length = {}, [0.0] * self.n, 0
        for gram, tf in ngram_counts(text, self.n).items():
            k = len(gram) - 1
            w = float(tf) * (self.log_images - math.log(max(1.0, self.document_frequency.get(gram, 0.0))))
            vec[gram] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def reference_vectors(self, references: Sequence[str]) -> list[tuple[dict, list[float], int]]:
        return [self.vector(r) for r in references]

    def score(self, candidate: str, references: list[tuple[dict, list[float], int]]) -> float:
        """CIDEr-D of one tokenised caption against an image's `reference_vectors`."""
        if not references:
            return 0.0
        vec, norm, length = self.vector(candidate)
        total = np.zeros(self.n)
        for ref_vec, ref_norm, ref_length in references:
            val = np.zeros(self.n)
            for gram, w in vec.items():
                r = ref_vec.get(gram, 0.0)
                val[len(gram) - 1] += min(w, r) * r
            for k in range(self.n):
                if norm[k] != 0 and ref_norm[k] != 0:
                    val[k] /= norm[k] * ref_norm[k]
            total += val * math.e ** (-(float(length - ref_length) ** 2) / (2 * self.sigma ** 2))
        return float(np.mean(total) / len(references) * 10.0)

    def scores(self, candidates: Sequence[str], references: Sequence[list]) -> np.ndarray:
        """Each candidate's CIDEr-D against its image's reference vectors (`references[i]`)."""
        return np.array([self.score(c, r) for c, r in zip(candidates, references)], dtype=np.float64)


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D of tokenised hypotheses (one per image) against tokenised references, as pycocoevalcap's
    `Cider().compute_score` computes it: the mean over images, and each image's score."""
    scorer = CiderD(references)
    per_image = [scorer.score(h, scorer.reference_vectors(refs)) for h, refs in zip(hypotheses, references)]
    return float(np.mean(per_image)), per_image
