"""Self-critical sequence training (captioner.scst) and the CIDEr-D it rewards (captioner.scoring.cider)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from captioner.data.vocabulary import Vocabulary
from captioner.decoders import LSTMDecoder, LSTMInitDecoder, RNNDecoder, ShowAttendTellDecoder, TransformerDecoder
from captioner.decoding import sample_captions, to_word_lists
from captioner.scoring.cider import CiderD, cider_d
from captioner.scoring.ptb import evaluation_texts
from captioner.scst import CaptionReward, SelfCritical, leave_one_out_mean, self_critical_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

# Captions as real datasets write them: capitals, punctuation, an apostrophe, a hyphen, repeated words.
REFERENCES = [
    ["A black dog runs across the grass.", "A dog is running on a lawn", "The black dog's running outside.",
     "a dog runs on green grass", "Black dog sprinting across a field."],
    ["Two children play soccer in a park.", "Kids are playing football on the grass", "two kids kick a ball",
     "Children playing with a soccer ball.", "Two young boys play soccer outdoors"],
    ["A man in a red shirt climbs a rock.", "A rock climber in red scales a cliff", "a man climbing a rock wall",
     "Man in a red T-shirt climbing rocks.", "A climber ascends a steep rock face"],
    ["A woman rides a bike down the street.", "A lady cycling on a city road", "a woman on a bicycle",
     "Woman riding her bike in the city.", "A cyclist rides down a busy street"],
]
HYPOTHESES = ["a black dog runs on the grass", "two kids play soccer", "a man climbs a rock wall", "a dog on a bike"]
DECODERS = {"rnn": RNNDecoder, "lstm": LSTMDecoder, "lstm_init": LSTMInitDecoder, "transformer": TransformerDecoder,
            "show_attend_tell": ShowAttendTellDecoder}


# -- CIDEr-D ------------------------------------------------------------------------------------------------------
def test_cider_d_equals_pycocoevalcap():
    """The test metric's CIDEr-D, and so the reward's code, is pycocoevalcap's Cider, image by image."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = evaluation_texts(HYPOTHESES, REFERENCES, "python")
    official, official_per = Cider().compute_score(gts, res)
    ours, ours_per = cider_d([res[i][0] for i in res], [gts[i] for i in gts])
    assert ours == pytest.approx(official, abs=1e-12)
    assert ours_per == pytest.approx(list(official_per), abs=1e-12)
    assert len(set(np.round(ours_per, 6))) == len(ours_per)  # distinct scores: the comparison is not trivial


def test_reward_document_frequencies_are_the_training_corpus():
    """The reward's idf comes from the training references, not from the images being scored: a caption's reward
    is the same whatever else is in the batch, and a word every training image has is worth nothing."""
    refs = [["a dog runs", "a dog"], ["a cat sits", "a cat"], ["a bird flies", "a bird"]]
    scorer = CiderD(refs)
    assert scorer.document_frequency[("a",)] == 3 and scorer.document_frequency[("dog",)] == 1
    vec, _, _ = scorer.vector("a dog")
    assert vec[("a",)] == 0.0 and vec[("dog",)] == pytest.approx(np.log(3))
    reward = CaptionReward(refs, tokenizer="python")
    alone = reward(["a dog runs"], [0])
    batch = reward(["a dog runs", "a cat", "a bird flies"], [0, 1, 2])
    assert batch[0] == pytest.approx(alone[0], abs=1e-12)


def test_reward_of_a_reference_beats_its_shuffled_words():
    reward = CaptionReward(REFERENCES, tokenizer="python")
    rng = random.Random(0)
    for image, refs in enumerate(REFERENCES):
        words = refs[0].split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        other = REFERENCES[(image + 1) % len(REFERENCES)][0]
        own, mixed, wrong = reward([refs[0], " ".join(shuffled), other], [image] * 3)
        assert own > mixed > wrong >= 0, (image, own, mixed, wrong)


def test_bleu_4_reward_is_pycocoevalcaps_sentence_bleu():
    from pycocoevalcap.bleu.bleu import Bleu

    reward = CaptionReward(REFERENCES, cider=0.0, bleu_4=1.0, tokenizer="python")
    gts, res = evaluation_texts(HYPOTHESES, REFERENCES, "python")
    _, per_sentence = Bleu(4).compute_score(gts, res, verbose=0)
    assert reward(HYPOTHESES, range(4)) == pytest.approx(per_sentence[3], abs=1e-12)


# -- the loss -----------------------------------------------------------------------------------------------------
def test_loss_is_minus_advantage_times_log_probability_over_kept_words():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 5).clamp(max=0).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    advantage = torch.tensor([0.5, -1.0, 2.0])
    loss = self_critical_loss(log_probs, mask, advantage)
    by_hand = -sum(advantage[i] * log_probs[i, j] for i in range(3) for j in range(5) if mask[i, j]) / mask.sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    assert (log_probs.grad[~mask] == 0).all()  # padding and everything after <eos>: no gradient
    assert (log_probs.grad[mask] != 0).all()
    expected = (-advantage[:, None] / mask.sum()).expand(3, 5)
    assert torch.allclose(log_probs.grad[mask], expected[mask])


def test_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 5.0])
    base = leave_one_out_mean(rewards, 3)
    loop = [np.mean([r for j, r in enumerate(group) if j != i]) for group in ([1, 2, 3], [10, 0, 5]) for i in range(3)]
    assert base.tolist() == pytest.approx(loop)


def tiny_world(feature: str = "pooled", n_images: int = 6, dim: int = 16):
    """Six images (random features), each described by its colour and shape in three wordings."""
    colors, shapes = ["red", "blue", "green"], ["circle", "square"]
    refs = [[f"a {c} {s}", f"a {c} {s} on white", f"one {c} {s}"] for c in colors for s in shapes][:n_images]
    vocab = Vocabulary.build([r for rs in refs for r in rs], min_count=1)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn((len(refs), 9, dim) if feature == "spatial" else (len(refs), dim), generator=g)
    return refs, vocab, feats


def build_decoder(name: str, vocab: Vocabulary, dim: int = 16):
    torch.manual_seed(0)
    extra = {"grid": (3, 3)} if DECODERS[name].feature == "spatial" else {}
    return DECODERS[name](vocab_size=len(vocab), feature_dim=dim, **extra)


DECODE = {"max_len": 8, "min_len": 1, "suppress_unk": True}


class ConstantReward:
    """Every caption earns the same: the greedy baseline then always equals the samples' reward."""

    def __call__(self, captions, images):
        return np.full(len(captions), 0.7)


@pytest.mark.parametrize("name", list(DECODERS))
def test_no_gradient_when_the_greedy_baseline_equals_the_sample(name):
    refs, vocab, feats = tiny_world(DECODERS[name].feature)
    dec = build_decoder(name, vocab)
    loss, logged = SelfCritical(samples=4).loss(dec, vocab, feats, torch.arange(len(refs)), ConstantReward(), DECODE)
    loss.backward()
    assert logged["reward"] == pytest.approx(logged["baseline_reward"])
    grads = [p.grad for p in dec.parameters() if p.grad is not None]
    assert grads and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_scst_step_trains_every_decoder(name, baseline):
    """Every decoder family (pooled, spatial; recurrent, attending) gets a finite loss and a gradient, and leaves
    the step in the train/eval mode it came in."""
    refs, vocab, feats = tiny_world(DECODERS[name].feature)
    dec = build_decoder(name, vocab).train()
    reward = CaptionReward(refs, tokenizer="python")
    loss, logged = SelfCritical(samples=3, baseline=baseline).loss(dec, vocab, feats, torch.arange(len(refs)),
                                                                   reward, DECODE)
    loss.backward()
    assert torch.isfinite(loss) and dec.training
    assert sum(float(p.grad.abs().sum()) for p in dec.parameters() if p.grad is not None) > 0
    assert logged["reward"] >= 0


def sampled_reward(dec, vocab, feats, reward, n: int = 30) -> float:
    """The mean reward of n sampled captions per image, with a fixed generator."""
    seqs = sample_captions(dec.eval(), feats, n, max_len=8, suppress=[vocab.unk_id],
                           generator=torch.Generator().manual_seed(1))
    captions = [vocab.decode(w) for w in to_word_lists(seqs)]
    return float(reward(captions, torch.arange(len(feats)).repeat_interleave(n).tolist()).mean())


@pytest.mark.parametrize("baseline,warm_up,lr,steps", [("mean", 0, 2e-3, 200), ("greedy", 5, 5e-4, 150)])
def test_scst_raises_the_sampled_cider(baseline, warm_up, lr, steps):
    """A few hundred SCST steps on a fixed small set: the mean CIDEr-D of sampled captions rises well (the loss
    really optimises the reward). The greedy baseline starts from a briefly cross-entropy-trained model, as SCST
    does: from random weights most samples are worse than the greedy caption, and pushing all of them (and their
    <eos>) down makes captions run on ("square square square ..."); the leave-one-out mean has no such bias."""
    refs, vocab, feats = tiny_world()
    dec = build_decoder("lstm_init", vocab)
    reward = CaptionReward(refs, tokenizer="python")
    if warm_up:
        from captioner.data.vocabulary import encode_captions

        ids, _ = encode_captions(vocab, [r[0] for r in refs], 10)
        caps = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for i, x in enumerate(ids):
            caps[i, :len(x)] = torch.tensor(x)
        opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
        for _ in range(warm_up):
            logits = dec.train()(feats, caps)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), caps[:, 1:].flatten(), ignore_index=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    before = sampled_reward(dec, vocab, feats, reward)
    scst = SelfCritical(samples=5, baseline=baseline)
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = scst.loss(dec, vocab, feats, torch.arange(len(refs)), reward, DECODE)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sampled_reward(dec, vocab, feats, reward)
    assert after > before + 1.0 and after > 1.5 * before, (before, after)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="samples >= 2"):
        SelfCritical(samples=1, baseline="mean")
    with pytest.raises(ValueError, match="greedy or mean"):
        SelfCritical(baseline="beam")


# -- end to end: the two-stage command ----------------------------------------------------------------------------
TINY = ["debug=tiny", "model=dino_lstm_init", "decoder.dropout=0.0"]


def _csv_rows(run_dir):
    import csv

    return list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))


def _column(rows, key):
    return [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def xe_run(tiny_root, tmp_path_factory):
    from conftest import run_here

    run_dir = tmp_path_factory.mktemp("scst") / "xe"
    r = run_here(["train.py", *TINY, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"], tiny_root)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.mark.e2e
def test_scst_stage_from_a_cross_entropy_run_then_resume(tiny_root, xe_run, tmp_path):
    from conftest import run_here

    run_dir = tmp_path / "scst"
    args = ["train.py", *TINY, "stage=scst", f"init_from={xe_run}", "trainer.log_every_n_steps=1",
            f"hydra.run.dir={run_dir}"]
    r = run_here([*args, "trainer.max_epochs=1"], tiny_root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["stage"] == "scst" and m["selected_by"] == "val/cider" and m["best_val_bleu_4"] is None
    assert m["init_from"] == str(next((xe_run / "checkpoints").glob("best-*.ckpt")))
    rows = _csv_rows(run_dir)
    assert m["best_val_cider"] == pytest.approx(max(v for _, v in _column(rows, "val/cider")), abs=1e-6)
    assert _column(rows, "train/reward") and _column(rows, "train/baseline_reward")
    # it starts from the cross-entropy weights (a random decoder's validation loss is ~log(vocabulary) higher)
    xe_val = dict(_column(_csv_rows(xe_run), "val/loss"))
    start = _column(rows, "val/loss")[0][1]
    assert abs(start - min(xe_val.values())) < 0.2 * min(xe_val.values()), (start, xe_val)
    assert "dino_lstm_init+scst: test BLEU-4" in r.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "predictions.jsonl").exists()
    # one batch of 16 training images per step: 40 images -> 3 steps an epoch
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 3

    r = run_here([*args, "trainer.max_epochs=2", "ckpt_path=last"], tiny_root)  # resume, one more epoch
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["stage"] == "scst"
    assert [e for e, _ in _column(_csv_rows(run_dir), "val/cider")] == [0, 1]  # each epoch once


@pytest.mark.parametrize("overrides,message", [
    (["stage=scst"], "stage=scst fine-tunes a cross-entropy model: add init_from="),
    (["init_from=/some/run"], "only read by stage=scst"),
    (["stage=scst", "init_from=/some/run", "scst.baseline=mean", "scst.samples=1"], "scst.baseline=mean"),
    (["stage=scst", "init_from=/some/run", "scst.reward.cider=0"], "there would be nothing to learn"),
    (["stage=scst", "init_from=/some/run", "+scst.sampels=3"], "did you mean scst.samples"),
    (["decode.sample=true", "decode.beam_size=3"], "decode.sample=true"),
])
def test_settings_of_the_stage_that_cannot_work_are_refused(overrides, message):
    from captioner.config import compose
    from captioner.errors import ConfigError
    from captioner.training import check_config

    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_config(compose(["debug=tiny", *overrides]))


@pytest.mark.e2e
def test_scst_refuses_weights_that_do_not_fit(tiny_root, xe_run, tmp_path):
    from conftest import run_here

    r = run_here(["train.py", *TINY, "stage=scst", f"init_from={xe_run}", "decoder=lstm", "model.name=other",
                 f"hydra.run.dir={tmp_path / 'c'}"], tiny_root)
    assert r.returncode == 2 and "cannot fine-tune from it" in r.stderr and "init_from" in r.stderr
