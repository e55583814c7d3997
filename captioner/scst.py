"""Self-critical sequence training (Rennie et al. 2017), the second training stage: `stage=scst init_from=CKPT`.

After cross-entropy training, the captioner is fine-tuned to maximise the score of its own captions: for every
training image it samples `samples` captions, rewards each with its CIDEr-D against the image's references, and
follows REINFORCE with a baseline,

    loss = -(reward - baseline) * log p(sampled caption),   a mean over the sampled words (and <eos>)

where the baseline is the reward of the model's own greedy caption (`baseline: greedy`, the paper's "self-critical"
one) or the mean reward of the image's other samples (`baseline: mean`, "new SCST"). A caption better than what
the model would say anyway is made more likely, a worse one less. Padding after `<eos>` carries no gradient.

- The reward is `captioner.scoring.cider.CiderD`, the test metric's own implementation, with the document
  frequencies of the TRAINING references, computed once (as ImageCaptioning.pytorch does); optionally mixed with
  sentence BLEU-4 (`reward.bleu_4`). References and sampled captions are tokenised as the evaluation tokenises them.
- Captions are sampled with the decoder in eval mode, and the log-probabilities are taken in eval mode too: with
  dropout on, the captions would come from one random network and the gradient would follow another.
- Sampling and the greedy baseline run without gradient (`captioner.decoding`); the log-probabilities come from
  one teacher-forced pass over the samples, so every decoder family works, recurrent or attending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .decoding import greedy_decode, sample_captions, to_word_lists
from .scoring.cider import CiderD
from .scoring.ptb import python_ptb_tokenize, tokenized_references


class CaptionReward:
    """The reward of generated captions of training images: `cider` x CIDEr-D + `bleu_4` x sentence BLEU-4 against
    the image's references. `references`: every training image's references as written, in dataset order."""

    def __init__(self, references: Sequence[Sequence[str]], cider: float = 1.0, bleu_4: float = 0.0,
                 tokenizer: str = "auto") -> None:
        gts = tokenized_references(references, tokenizer)  # as the evaluation tokenises them, once
        self.references = [gts[i] for i in range(len(references))]
        self.cider_weight, self.bleu_weight = float(cider), float(bleu_4)
        self.cider = CiderD(self.references)
        self._vectors: dict[int, list] = {}
        self._cooked: dict[int, list] = {}
        self._tokens: dict[str, str] = {}

    def tokenized(self, captions: Sequence[str]) -> list[str]:
        """Each generated caption as the evaluation tokenises it (the Java tokenizer's pure-Python twin, token for
        token equal to it, so no JVM per step); each distinct caption is tokenised once."""
        new = [c for c in dict.fromkeys(captions) if c not in self._tokens]
        for c in new:
            self._tokens[c] = python_ptb_tokenize([c])[0]
        if len(self._tokens) > 200_000:  # a cache, not a leak: samples rarely repeat late in training
            self._tokens = {c: self._tokens[c] for c in captions}
        return [self._tokens[c] for c in captions]

    def _vectors_of(self, image: int) -> list:
        if image not in self._vectors:
            self._vectors[image] = self.cider.reference_vectors(self.references[image])
        return self._vectors[image]

    def __call__(self, captions: Sequence[str], images: Sequence[int]) -> np.ndarray:
        """(N,) rewards of `captions`, caption i describing training image images[i]."""
        tokens = self.tokenized(captions)
        reward = np.zeros(len(tokens))
        if self.cider_weight:
            reward += self.cider_weight * self.cider.scores(tokens, [self._vectors_of(i) for i in images])
        if self.bleu_weight:
            reward += self.bleu_weight * self.sentence_bleu_4(tokens, images)
        return reward

    def sentence_bleu_4(self, tokens: Sequence[str], images: Sequence[int]) -> np.ndarray:
        """pycocoevalcap's per-caption BLEU-4 (its smoothing constants included), against each image's references."""
        from .scoring.bootstrap import bleu_from_stats, bleu_stats, cook_references

        for i in set(images) - set(self._cooked):
            self._cooked[i] = cook_references([self.references[i]], tokenizer=None)[0]
        stats = bleu_stats(list(tokens), [()] * len(tokens), cooked=[self._cooked[i] for i in images], tokenizer=None)
        return bleu_from_stats(stats)[:, 3]


def self_critical_loss(log_probs: Tensor, mask: Tensor, advantage: Tensor) -> Tensor:
    """-(reward - baseline) * log p(word), averaged over the words `mask` keeps (sampled words and `<eos>`, not
    the padding after it). log_probs, mask (N, T); advantage (N,), a constant (no gradient flows into it)."""
    mask = mask.to(log_probs.dtype)
    return -(advantage.detach()[:, None].to(log_probs.dtype) * log_probs * mask).sum() / mask.sum().clamp(min=1)


def leave_one_out_mean(rewards: Tensor, samples: int) -> Tensor:
    """(B*n,) rewards, n samples per image -> each sample's baseline: the mean reward of its image's OTHER samples."""
    per_image = rewards.view(-1, samples)
    return ((per_image.sum(dim=1, keepdim=True) - per_image) / (samples - 1)).reshape(-1)


@dataclass
class SelfCritical:
    """The SCST settings (`scst:` of conf/stage/scst.yaml) and its training step."""

    samples: int = 5
    temperature: float = 1.0
    top_k: int = 0
    baseline: str = "greedy"  # greedy | mean
    reward: Mapping[str, float] = field(default_factory=lambda: {"cider": 1.0, "bleu_4": 0.0})

    def __post_init__(self) -> None:
        if self.baseline not in ("greedy", "mean"):
            raise ValueError(f"scst.baseline must be greedy or mean, got {self.baseline!r}")
        if self.baseline == "mean" and self.samples < 2:
            raise ValueError("scst.baseline=mean needs scst.samples >= 2 (the other samples of the image)")

    def build_reward(self, references: Sequence[Sequence[str]], tokenizer: str) -> CaptionReward:
        return CaptionReward(references, tokenizer=tokenizer, **dict(self.reward))

    def loss(self, decoder: torch.nn.Module, vocab, features: Tensor, images: Tensor, reward: CaptionReward,
             decode: Mapping) -> tuple[Tensor, dict[str, float]]:
        """The SCST loss of one batch of training images (`features` (B, ...), their indices in the training split
        `images` (B,)), and what to log of it: the mean reward of the samples and of the baseline."""
        was_training = decoder.training
        decoder.eval()  # one policy for sampling and for the gradient: see the module docstring
        try:
            common = dict(max_len=decode["max_len"], min_len=decode["min_len"], sos_id=vocab.sos_id,
                          eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                          suppress=[vocab.unk_id] if decode["suppress_unk"] else [])
            n = self.samples
            seqs = sample_captions(decoder, features, n, self.temperature, self.top_k, **common)
            image_of = images.repeat_interleave(n).tolist()
            rewards = torch.as_tensor(reward([vocab.decode(w) for w in to_word_lists(seqs)], image_of),
                                      dtype=torch.float32, device=features.device)
            if self.baseline == "greedy":
                greedy = greedy_decode(decoder, features, **common)
                base = torch.as_tensor(reward([vocab.decode(w) for w in greedy], images.tolist()),
                                       dtype=torch.float32, device=features.device).repeat_interleave(n)
            else:
                base = leave_one_out_mean(rewards, n)
            mask = seqs != vocab.pad_id  # the words and <eos>; an <eos> is never followed by anything but padding
            seqs = seqs[:, :max(1, int(mask.sum(dim=1).max()))]
            mask = mask[:, :seqs.shape[1]]
            inputs = torch.cat([torch.full_like(seqs[:, :1], vocab.sos_id), seqs], dim=1)
            index = torch.arange(len(features), device=features.device).repeat_interleave(n)
            logits = decoder(features, inputs, index)
            log_probs = logits.float().log_softmax(dim=-1).gather(2, seqs.unsqueeze(2)).squeeze(2)
            loss = self_critical_loss(log_probs, mask, rewards - base)
        finally:
            decoder.train(was_training)
        return loss, {"reward": float(rewards.mean()), "baseline_reward": float(base.mean())}
