"""Our BLEU equals pycocoevalcap's and NLTK's corpus BLEU on the same tokens; metrics use all references."""

import math

import pytest

from captioner.data.vocabulary import normalize
from captioner.metrics import bleu_metrics, caption_metrics

HYPS = [
    "a large red circle to the left of a small blue square",
    "there is a green star above an orange triangle",
    "a purple circle right of a yellow square and a red star",
    "a small blue triangle below a large green circle .",
]
REFS = [
    ["a large red circle to the left of a small blue square", "a red circle left of a blue square",
     "there is a blue square right of a red circle"],
    ["a green star over an orange triangle", "an orange triangle below a green star",
     "there is a small green star above a large orange triangle"],
    ["a yellow square left of a purple circle , plus a red star", "a purple circle to the right of a yellow square",
     "an image of a red star and a purple circle right of a yellow square"],
    ["a small blue triangle beneath a large green circle", "a green circle above a blue triangle"],
]


def test_pycocoevalcap_bleu_equals_nltk_and_torchmetrics():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    ours = caption_metrics(HYPS, REFS, meteor=False)
    hyp_tokens = [normalize(h).split() for h in HYPS]
    ref_tokens = [[normalize(r).split() for r in refs] for refs in REFS]
    tm = bleu_metrics()
    for n in range(1, 5):
        weights = tuple([1.0 / n] * n)
        expected = nltk_bleu.corpus_bleu(ref_tokens, hyp_tokens, weights=weights)
        assert ours[f"bleu_{n}"] == pytest.approx(expected, abs=1e-6), n
        metric = tm[f"bleu_{n}"]
        metric.update([normalize(h) for h in HYPS], [[normalize(r) for r in refs] for refs in REFS])
        assert float(metric.compute()) == pytest.approx(expected, abs=1e-5), n
    assert 0 < ours["bleu_4"] < ours["bleu_1"] < 1


def test_multi_reference_beats_single_reference_and_perfect_is_one():
    perfect = caption_metrics([r[0] for r in REFS], REFS, meteor=False)
    assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    multi = caption_metrics(HYPS, REFS, meteor=False)["bleu_4"]
    single = caption_metrics(HYPS, [[r[-1]] for r in REFS], meteor=False)["bleu_4"]
    assert multi > single  # evaluating against one reference per image is the classic deflation bug


def test_meteor_is_a_number_with_java_and_none_without(monkeypatch):
    import captioner.metrics as metrics

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    assert caption_metrics(HYPS, REFS)["meteor"] is None
    monkeypatch.undo()
    if metrics.java_available():
        m = caption_metrics(HYPS, REFS)["meteor"]
        assert m is not None and 0 < m < 1 and not math.isnan(m)


def test_cider_rewards_consensus_and_empty_hypotheses_do_not_crash():
    good = caption_metrics(HYPS, REFS, meteor=False)["cider"]
    bad = caption_metrics(["a dog runs on the grass"] * 4, REFS, meteor=False)
    assert good > 1.0 > bad["cider"]
    empty = caption_metrics(["", "", "", ""], REFS, meteor=False)
    assert empty["bleu_4"] < 1e-6 and empty["cider"] == pytest.approx(0.0, abs=1e-9)


def test_caption_prior_picks_the_constant_caption_with_the_best_pycocoevalcap_bleu():
    """The prior baseline scores candidates from cooked sufficient statistics; it must choose, and report, what a
    full pycocoevalcap run per candidate would."""
    from types import SimpleNamespace

    from captioner.training import caption_prior_baseline

    train = [SimpleNamespace(captions=refs) for refs in REFS * 3]
    dm = SimpleNamespace(records={"train": train})
    test_refs = REFS[::-1]
    got = caption_prior_baseline(dm, [{"references": r} for r in test_refs], candidates=50)
    pool = sorted({normalize(c) for refs in REFS for c in refs})
    train_refs = [[normalize(c) for c in r.captions] for r in train]
    best = max(pool, key=lambda c: caption_metrics([c] * len(train_refs), train_refs, meteor=False)["bleu_4"])
    want = caption_metrics([best] * len(test_refs), test_refs, meteor=False)["bleu_4"]
    assert got == pytest.approx(want, abs=1e-12) and got > 0
