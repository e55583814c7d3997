"""Tests of greedy decoding and batched beam search (captioner.decoding)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from captioner.data.vocabulary import Vocabulary
from captioner.decoders import LSTMDecoder, LSTMInitDecoder, RNNDecoder, ShowAttendTellDecoder, TransformerDecoder
from captioner.decoding import beam_search, greedy_decode, sample_captions, to_word_lists

PAD, SOS, EOS = Vocabulary.pad_id, Vocabulary.sos_id, Vocabulary.eos_id
SPECIAL = {PAD, SOS, EOS}
A, B, C, D, E, F = 4, 5, 6, 7, 8, 9  # words of the hand-made decoders
DECODERS = {"rnn": RNNDecoder, "lstm": LSTMDecoder, "lstm_init": LSTMInitDecoder, "transformer": TransformerDecoder,
            "show_attend_tell": ShowAttendTellDecoder}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


class TableDecoder(nn.Module):
    """A bigram decoder with a hand-set transition table P(next | previous); ignores the image.

    `table[prev][next] = p`; every word not listed gets a tiny probability, so all sequences stay possible.
    """

    feature = "pooled"

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int = 10, never_eos: bool = False) -> None:
        super().__init__()
        probs = torch.full((vocab_size, vocab_size), 1e-4)
        for prev, row in table.items():
            for word, p in row.items():
                probs[prev, word] = p
        if never_eos:
            probs[:, EOS] = 0.0  # log 0 = -inf: <eos> impossible
        self.register_buffer("logp", (probs / probs.sum(1, keepdim=True)).log())

    def init_state(self, features):
        return {"n": torch.zeros(features.shape[0], dtype=torch.long, device=features.device)}

    def step(self, tokens, state):
        return self.logp[tokens], {"n": state["n"] + 1}

    def score(self, words: list[int]) -> float:
        """log P(words <eos>) under the table."""
        seq = [SOS, *words, EOS]
        return sum(self.logp[a, b].item() for a, b in zip(seq, seq[1:]))


def no_specials(captions: list[list[int]]) -> bool:
    return all(not SPECIAL & set(c) for c in captions)


def trained_decoder(name: str):
    """A fresh copy of `_trained(name)` that a test may modify."""
    dec, feats = _trained(name)
    return copy.deepcopy(dec), feats.clone()


@functools.lru_cache(maxsize=None)
def _trained(name: str, steps: int = 40):
    """A briefly trained decoder, with image features to decode, half seen in training, half new.

    Random weights make poor test subjects (near-uniform, image-blind logits, <eos> never or always); a few
    dozen steps on captions of lengths 1..8 give image-dependent captions that end at different lengths.
    """
    torch.manual_seed(0)
    V, dim, grid, n = 40, 16, (3, 3), 8
    # transformer: small position tables, so that 40 steps on random-noise "images" already give image-dependent
    # captions (with content-scale positions, which every image shares, the few steps give one caption for all)
    extra = {"grid": grid, "position_std": 0.02} if name == "transformer" else {}
    extra = {"grid": grid} if name == "show_attend_tell" else extra
    dec = DECODERS[name](vocab_size=V, feature_dim=dim, **extra)
    shape = (2 * n, 9, dim) if dec.feature == "spatial" else (2 * n, dim)
    feats = torch.randn(shape)
    caps = torch.full((n, 10), PAD)
    for i in range(n):
        caps[i, : i + 3] = torch.tensor([SOS, *torch.randint(4, V, (i + 1,)).tolist(), EOS])
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3)
    for _ in range(steps):
        logits = dec(feats[:n], caps)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), caps[:, 1:].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval(), feats[n // 2 : n + n // 2]


# A transition table where the locally best first word leads nowhere good:
#   greedy: A (0.5) -> C (0.4) -> <eos>          P = 0.19
#   best:   B (0.4) -> C (0.9) -> <eos>          P = 0.342
TRAP = {SOS: {A: 0.5, B: 0.4}, A: {C: 0.4, D: 0.32, EOS: 0.28}, B: {C: 0.9, EOS: 0.1}, C: {EOS: 0.95}, D: {EOS: 0.95}}


@pytest.mark.parametrize("beam_size", [2, 3])
def test_beam_finds_the_globally_best_caption(beam_size):
    dec, feats = TableDecoder(TRAP), torch.zeros(2, 4)
    greedy, g_scores = greedy_decode(dec, feats, return_scores=True)
    beam, b_scores = beam_search(dec, feats, beam_size=beam_size, return_scores=True)
    assert greedy == [[A, C]] * 2 and beam == [[B, C]] * 2
    assert dec.score([A, C]) < dec.score([B, C])
    assert g_scores[0] == pytest.approx(dec.score([A, C]), abs=1e-5)
    assert b_scores[0] == pytest.approx(dec.score([B, C]), abs=1e-5)
    assert beam_search(dec, feats, beam_size=1) == greedy


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("min_len", [0, 1, 3])
def test_beam_size_one_is_greedy(name, min_len):
    dec, feats = trained_decoder(name)
    greedy, g_scores = greedy_decode(dec, feats, max_len=12, min_len=min_len, return_scores=True)
    beam, b_scores = beam_search(dec, feats, beam_size=1, max_len=12, min_len=min_len, return_scores=True)
    assert beam == greedy
    assert b_scores == pytest.approx(g_scores, abs=1e-4)
    assert no_specials(beam) and all(min_len <= len(c) <= 12 for c in beam)


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("min_len, length_penalty", [(1, 0.0), (3, 0.7)])
def test_batched_beam_search_equals_one_image_at_a_time(name, min_len, length_penalty):
    """Guards the flattened B*K index arithmetic: each image must get exactly its own search."""
    dec, feats = trained_decoder(name)
    kw = dict(beam_size=3, max_len=12, min_len=min_len, length_penalty=length_penalty)
    batched = beam_search(dec, feats, **kw)
    single = [beam_search(dec, feats[i : i + 1], **kw)[0] for i in range(len(feats))]
    assert batched == single
    assert no_specials(batched) and all(min_len <= len(c) <= 12 for c in batched)
    assert len({tuple(c) for c in batched}) > 1  # different images, different captions
    assert any(len(c) < 12 for c in batched)  # some searches really ended with <eos>


def test_never_eos_returns_max_len_words():
    dec, feats = TableDecoder(TRAP, never_eos=True), torch.zeros(3, 4)
    for out in (greedy_decode(dec, feats, max_len=7), beam_search(dec, feats, beam_size=3, max_len=7)):
        assert [len(c) for c in out] == [7, 7, 7] and no_specials(out)
    # and a real decoder whose <eos> logit is hopeless
    dec, feats = trained_decoder("transformer")
    with torch.no_grad():
        dec.head.bias[EOS] = -1e4
    for k in (1, 3):
        out, scores = beam_search(dec, feats, beam_size=k, max_len=9, return_scores=True)
        assert all(len(c) == 9 for c in out) and no_specials(out) and all(math.isfinite(s) for s in scores)


# <eos> is the most likely next word everywhere (and right after <sos>); the only way on is A -> B -> C -> A ...
EAGER = {SOS: {EOS: 0.7, A: 0.3}, A: {EOS: 0.9, B: 0.1}, B: {EOS: 0.9, C: 0.1}, C: {EOS: 0.9, A: 0.1}}


def test_min_len():
    dec, feats = TableDecoder(EAGER), torch.zeros(2, 4)
    assert beam_search(dec, feats, min_len=0) == [[], []]  # the empty caption is allowed, and no crash
    assert greedy_decode(dec, feats) == [[], []]
    assert beam_search(dec, feats) == [[A], [A]]  # default min_len=1
    for k in (1, 3):
        assert beam_search(dec, feats, beam_size=k, min_len=3) == [[A, B, C]] * 2
    assert greedy_decode(dec, feats, min_len=3) == [[A, B, C]] * 2


# Short and likely vs long and (per word) very likely:
#   [A]          P = 0.6 * 0.9  = 0.54       log = -0.62, /((5+1)/6)^2 = -0.62
#   [B, C, D, E] P = 0.4 * .99^4 = 0.384     log = -0.96, /((5+4)/6)^2 = -0.42
LONG = {SOS: {A: 0.6, B: 0.4}, A: {EOS: 0.9, F: 0.1}, B: {C: 0.99}, C: {D: 0.99}, D: {E: 0.99}, E: {EOS: 0.99}}


def test_length_penalty_changes_the_ranking():
    dec, feats = TableDecoder(LONG), torch.zeros(2, 4)
    assert beam_search(dec, feats, beam_size=3, max_len=10) == [[A]] * 2
    out, scores = beam_search(dec, feats, beam_size=3, max_len=10, length_penalty=2.0, return_scores=True)
    assert out == [[B, C, D, E]] * 2
    assert scores[0] == pytest.approx(dec.score([B, C, D, E]) / 1.5**2, abs=1e-5)


def test_special_tokens_are_never_generated():
    dec, feats = trained_decoder("lstm")
    with torch.no_grad():
        dec.head.bias[[PAD, SOS]] += 50.0  # a model that loves <pad>/<sos>
    for out in (greedy_decode(dec, feats, max_len=8), beam_search(dec, feats, beam_size=4, max_len=8)):
        assert no_specials(out) and all(1 <= len(c) <= 8 for c in out)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_decoding_under_autocast_and_inference(name):
    dec, feats = trained_decoder(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        greedy = greedy_decode(dec, feats, max_len=10)
        beam, scores = beam_search(dec, feats, beam_size=3, max_len=10, return_scores=True)
    assert len(greedy) == len(beam) == len(feats) and no_specials(greedy + beam)
    assert all(math.isfinite(s) and s <= 0 for s in scores)
    assert all(p.grad is None for p in dec.parameters())


def _weight_casts(fn) -> int:
    """bf16 casts of 2-D float32 tensors (the Linear weights, and 2-D activations) while `fn` runs under CPU
    autocast."""
    from torch.profiler import profile

    with torch.autocast("cpu", dtype=torch.bfloat16), profile(record_shapes=True) as prof:
        fn()
    return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
               if e.key == "aten::_to_copy" and e.input_shapes and len(e.input_shapes[0]) == 2)


def test_decoding_keeps_autocasts_weight_copies_across_steps():
    """Decoding runs under no_grad, not inference mode: there autocast re-casts every weight at every step."""
    dec, feats = trained_decoder("transformer")
    dec.eval()
    steps = 10
    kw = dict(beam_size=3, max_len=steps, min_len=steps)  # every image runs all `steps` steps
    per_search = _weight_casts(lambda: beam_search(dec, feats, **kw))
    with torch.inference_mode():
        per_step = _weight_casts(lambda: beam_search.__wrapped__(dec, feats, **kw))
    assert per_step >= steps * 2  # inference mode: every Linear weight cast again at every step
    assert per_search * 4 <= per_step, (per_search, per_step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(DECODERS))
def test_decoding_on_cuda_matches_cpu(name):
    dec, feats = trained_decoder(name)
    cpu = beam_search(dec, feats, beam_size=3, max_len=10)
    dec, feats = dec.cuda(), feats.cuda()
    assert beam_search(dec, feats, beam_size=3, max_len=10) == cpu
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = beam_search(dec, feats, beam_size=3, max_len=10)
        assert no_specials(out) and greedy_decode(dec, feats, max_len=10)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_one_decode_config_drives_greedy_and_beam_search(beam_size):
    """`decode.min_len` and `decode.suppress_unk` reach greedy decoding (validation/test's default) as they reach
    beam search: greedy once returned empty captions under min_len=1."""
    from captioner.modules import DECODE_DEFAULTS, Captioner

    UNK = Vocabulary.unk_id
    model = Captioner.__new__(Captioner)  # a Captioner around a hand-made decoder: only generate() is used
    nn.Module.__init__(model)
    model.decoder = TableDecoder({SOS: {EOS: 0.6, UNK: 0.3, A: 0.1}, UNK: {EOS: 0.9, B: 0.1},
                                  A: {EOS: 0.9, B: 0.1}, B: {EOS: 0.9, C: 0.1}, C: {EOS: 0.9, A: 0.1}})
    model.vocab = Vocabulary(["a", "b", "c", "d", "e", "f"])
    model.decode_cfg = {**DECODE_DEFAULTS, "beam_size": beam_size}
    feats = torch.zeros(2, 4)
    assert DECODE_DEFAULTS["min_len"] == 1 and DECODE_DEFAULTS["suppress_unk"]
    assert model.generate(feats) == ["a", "a"]  # not "" (min_len), not "<unk>" (suppressed)
    assert model.generate(feats, suppress_unk=False) == ["<unk>", "<unk>"]
    assert model.generate(feats, min_len=0) == ["", ""]
    assert model.generate(feats, min_len=3) == ["a b c", "a b c"]


# -- block_trigrams and sampling ----------------------------------------------------------------------------------
# A decoder that loops A -> B -> C -> A ... and never ends: "A B C A B C ..." repeats its first trigram.
LOOP = {SOS: {A: 0.9}, A: {B: 0.9}, B: {C: 0.9}, C: {A: 0.8, D: 0.1}, D: {A: 0.5, E: 0.4}}


def repeated_trigrams(words: list[int]) -> list[tuple]:
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return sorted({g for g in grams if grams.count(g) > 1})


def path_score(dec: TableDecoder, words: list[int]) -> float:
    """log P(words) under the table, without an ending."""
    seq = [SOS, *words]
    return sum(dec.logp[a, b].item() for a, b in zip(seq, seq[1:]))


def brute_force_best_without_repeats(dec: TableDecoder, length: int, vocab: list[int]) -> list[int]:
    """The most probable caption of `length` words with no repeated trigram, by enumeration."""
    import itertools

    candidates = (list(w) for w in itertools.product(vocab, repeat=length) if not repeated_trigrams(list(w)))
    return max(candidates, key=lambda w: path_score(dec, w))


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_block_trigrams_never_repeats_a_trigram(search):
    dec, feats = TableDecoder(LOOP, never_eos=True), torch.zeros(4, 4)
    run = {"greedy": lambda **kw: greedy_decode(dec, feats, max_len=12, **kw),
           "beam": lambda **kw: beam_search(dec, feats, beam_size=3, max_len=12, **kw),
           "sample": lambda **kw: to_word_lists(sample_captions(
               dec, feats, 8, max_len=12, generator=torch.Generator().manual_seed(0), **kw))}[search]
    free, blocked = run(), run(block_trigrams=True)
    assert any(repeated_trigrams(w) for w in free)  # the loop does repeat without the block (the test can fail)
    assert all(not repeated_trigrams(w) for w in blocked) and no_specials(blocked)
    assert all(len(w) >= 3 for w in blocked)


def test_beam_search_with_block_trigrams_finds_the_best_caption_without_repeats():
    """Banning a word at a step leaves every other continuation's score the model's own: beam search with a wide
    beam finds the caption a brute-force search over all non-repeating captions finds (never-ending captions of
    max_len words, where the most probable one repeats a trigram)."""
    table = {SOS: {A: 0.6, B: 0.3}, A: {B: 0.6, C: 0.2}, B: {A: 0.7, C: 0.2}, C: {A: 0.5, B: 0.4}}
    dec, feats = TableDecoder(table, vocab_size=7, never_eos=True), torch.zeros(1, 4)
    best = brute_force_best_without_repeats(dec, 6, [A, B, C])
    found = beam_search(dec, feats, beam_size=27, max_len=6, block_trigrams=True)[0]
    assert repeated_trigrams(found) == [] and path_score(dec, found) == pytest.approx(path_score(dec, best), abs=1e-6)
    assert repeated_trigrams(beam_search(dec, feats, beam_size=27, max_len=6)[0])  # unblocked: A B A B A B


def test_sampling_follows_the_model_distribution():
    """First-word frequencies over many samples match softmax(logits / temperature); top_k keeps the k most
    probable words only."""
    table = {SOS: {A: 0.6, B: 0.3, C: 0.1}, A: {EOS: 1.0}, B: {EOS: 1.0}, C: {EOS: 1.0}}
    dec, feats = TableDecoder(table), torch.zeros(1, 4)
    p = torch.softmax(dec.logp[SOS], dim=0)
    for temperature, top_k in ((1.0, 0), (0.5, 0), (1.0, 2)):
        seqs = sample_captions(dec, feats, 6000, temperature, top_k, max_len=3,
                               generator=torch.Generator().manual_seed(1))
        freq = torch.bincount(seqs[:, 0], minlength=10).float() / len(seqs)
        expect = p ** (1 / temperature)
        if top_k:
            expect[expect < expect.topk(top_k).values[-1]] = 0
        expect[[SOS, PAD]] = 0  # never generated
        expect /= expect.sum()
        assert torch.allclose(freq[[A, B, C]], expect[[A, B, C]], atol=0.02), (temperature, top_k, freq, expect)
        assert (seqs[:, 1] == EOS).float().mean() > 0.99  # then <eos> (all but the 1e-4 leftovers of the table)


@pytest.mark.parametrize("name", list(DECODERS))
def test_samples_are_laid_out_per_image(name):
    """Rows b*n .. b*n+n-1 are image b's samples (per-image states kept at one row per image); with a temperature
    near 0 every sample is the image's greedy caption."""
    dec, feats = trained_decoder(name)
    n = 3
    seqs = sample_captions(dec, feats, n, temperature=0.01, max_len=12, min_len=1)
    assert to_word_lists(seqs) == [c for c in greedy_decode(dec, feats, max_len=12, min_len=1) for _ in range(n)]
    assert seqs.shape == (len(feats) * n, seqs.shape[1])
    assert len({tuple(c) for c in greedy_decode(dec, feats, max_len=12)}) > 1  # the images' captions differ


def test_sampling_never_emits_suppressed_words():
    table = {SOS: {Vocabulary.unk_id: 0.7, A: 0.2}, Vocabulary.unk_id: {EOS: 0.5, A: 0.4}, A: {EOS: 0.9}}
    dec, feats = TableDecoder(table), torch.zeros(50, 4)
    g = torch.Generator().manual_seed(0)
    free = to_word_lists(sample_captions(dec, feats, 4, max_len=8, generator=g))
    kept = to_word_lists(sample_captions(dec, feats, 4, max_len=8, generator=g, suppress=[Vocabulary.unk_id]))
    assert any(Vocabulary.unk_id in w for w in free)
    assert all(Vocabulary.unk_id not in w for w in kept)
