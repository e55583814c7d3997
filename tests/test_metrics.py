"""Our metrics equal the official COCO caption evaluation (pycocoevalcap's PTBTokenizer + scorers) and NLTK's
corpus BLEU on the same tokens; metrics use all references."""

import math
import shutil

import pytest

from captioner.scoring.metrics import caption_metrics, validation_scores
from captioner.scoring.ptb import ptb_tokenize

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the official PTBTokenizer and METEOR need Java")

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


def test_pycocoevalcap_bleu_equals_nltk():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    ours = caption_metrics(HYPS, REFS, meteor=False)
    hyp_tokens = [h.split() for h in ptb_tokenize(HYPS)]
    ref_tokens = [[r.split() for r in ptb_tokenize(refs)] for refs in REFS]
    for n in range(1, 5):
        weights = tuple([1.0 / n] * n)
        expected = nltk_bleu.corpus_bleu(ref_tokens, hyp_tokens, weights=weights)
        assert ours[f"bleu_{n}"] == pytest.approx(expected, abs=1e-6), n
    assert 0 < ours["bleu_4"] < ours["bleu_1"] < 1


# Human captions as Flickr8k/COCO have them (capitals, punctuation, possessives, hyphens, brackets, quotes) and
# hypotheses as a captioner writes them (the vocabulary's tokens joined by spaces).
HUMAN_REFS = [
    ["A man in a red T-shirt is riding his bike down the street.", "A cyclist (wearing red) rides past a shop.",
     "man on a bicycle", "A man's bike ride through town , on a sunny day", "Someone cycling; it's sunny."],
    ["Two dogs play in the snow.", "A black-and-white dog and a brown dog run through deep snow !",
     'The dogs are "playing" outside.', "two dogs playing in snow", "Dogs in the snow..."],
    ["A little girl in pink climbs the stairs of a wooden playhouse.", "A child is climbing stairs.",
     "A girl going into a wooden building", "Little girl climbing into a playhouse"],
]
HUMAN_HYPS = ["a man in a red t-shirt is riding a bike down the street .", "two dogs are playing in the snow !",
              "a little girl 's climbing the stairs of a wooden house"]


def official_scores(hyps, refs, meteor=True):
    """The COCO caption evaluation exactly as pycocoevalcap runs it (its PTBTokenizer, then its scorers)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu_{n + 1}": bleu[n] for n in range(4)}
    out["rouge_l"], _ = Rouge().compute_score(gts, res)
    out["cider"], _ = Cider().compute_score(gts, res)
    if meteor:
        scorer = Meteor()
        out["meteor"], _ = scorer.compute_score(gts, res)
        scorer.meteor_p.kill()
    return out


@pytest.mark.e2e
@needs_java
@pytest.mark.parametrize("tokenizer", ["java", "python"])
def test_metrics_equal_the_official_coco_caption_evaluation(tokenizer):
    official = official_scores(HUMAN_HYPS, HUMAN_REFS)
    ours = caption_metrics(HUMAN_HYPS, HUMAN_REFS, tokenizer=tokenizer)
    for name, value in official.items():
        assert ours[name] == pytest.approx(value, abs=1e-4), name
    # the suite's old tokenisation (punctuation kept as tokens) scored these higher: the test can tell
    assert 0 < ours["bleu_4"] < ours["bleu_1"] < 1


@needs_java
@pytest.mark.parametrize("tokenizer", ["java", "python"])
def test_hypotheses_and_references_are_tokenised_apart_as_pycocoevalcap_does(tokenizer):
    """The PTB lexer reads one call's captions as one text: the last hypothesis's "A." keeps its period only when
    no reference starting "A ..." follows it in the same call. pycocoevalcap tokenises the two sets apart."""
    hyps = ["a dog", "a sign with the letter A."]
    refs = [["A dog runs.", "a brown dog"], ["A sign with a big letter A on it.", "A sign"]]
    official = official_scores(hyps, refs, meteor=False)
    ours = caption_metrics(hyps, refs, meteor=False, tokenizer=tokenizer)
    for name, value in official.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name


def test_unk_is_one_token_at_validation_and_test():
    """With decode.suppress_unk=false a caption may hold <unk>: validation and test score it alike, as one
    token that matches no reference word."""
    hyps, refs = ["a <unk> dog runs on the grass"], [["a brown dog runs on the grass", "a dog runs"]]
    assert ptb_tokenize(hyps, backend="python") == ["a <unk> dog runs on the grass"]
    val = validation_scores(hyps, refs)
    test = caption_metrics(hyps, refs, meteor=False)
    assert val["bleu_1"] == pytest.approx(test["bleu_1"], abs=1e-12) == pytest.approx(6 / 7, abs=1e-6)


def test_multi_reference_beats_single_reference_and_perfect_is_one():
    perfect = caption_metrics([r[0] for r in REFS], REFS, meteor=False)
    assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    multi = caption_metrics(HYPS, REFS, meteor=False)["bleu_4"]
    single = caption_metrics(HYPS, [[r[-1]] for r in REFS], meteor=False)["bleu_4"]
    assert multi > single  # evaluating against one reference per image is the classic deflation bug


@pytest.mark.e2e
def test_meteor_is_a_number_with_java_and_none_without(monkeypatch):
    import captioner.scoring.metrics as metrics

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


@pytest.mark.e2e
def test_caption_prior_picks_the_constant_caption_with_the_best_pycocoevalcap_bleu():
    """The prior baseline scores candidates from cooked sufficient statistics; it must choose, and report, what a
    full pycocoevalcap run per candidate would."""
    from types import SimpleNamespace

    from captioner.scoring.metrics import caption_prior_baseline

    train = [SimpleNamespace(captions=refs) for refs in REFS * 3]
    dm = SimpleNamespace(records={"train": train})
    test_refs = REFS[::-1]
    got = caption_prior_baseline(dm, [{"references": r} for r in test_refs], candidates=50)
    pool = sorted({c for refs in REFS for c in ptb_tokenize(refs)})
    train_refs = [ptb_tokenize(r.captions) for r in train]
    best = max(pool, key=lambda c: caption_metrics([c] * len(train_refs), train_refs, meteor=False)["bleu_4"])
    want = caption_metrics([best] * len(test_refs), test_refs, meteor=False)["bleu_4"]
    assert got == pytest.approx(want, abs=1e-12) and got > 0
