"""captioner.report (experiments/compare.py's report): exact corpus BLEU from per-image sufficient statistics, the
paired bootstrap and its hierarchical (seed) extension, seed aggregation, and the report files built from small
fabricated sweep directories."""

import csv
import functools
import json
import sys
import types
from html.parser import HTMLParser

import numpy as np
import pytest

from captioner.report import ReportError, build_report, main
from captioner.report.runs import Run, Variant
from captioner.report.stats import (bootstrap_counts, delta_ci, hierarchical_deltas, resampled_bleu_4,
                                    resampled_mean, seed_summary)
from captioner.scoring.bootstrap import bleu_from_stats, bleu_stats
from captioner.scoring.metrics import caption_metrics
from test_metrics import HYPS, REFS

# varying lengths, multiple references, an empty hypothesis, repeated words (clipping), a hypothesis longer than
# all its references, a tie in the closest reference length (3 words: refs of 2 and 4 -> the shorter), one ref only
EDGE_HYPS = HYPS + [
    "",
    "circle",
    "a red red red red circle",
    "a blue square",
    "there is a very very large green star to the left of a small orange triangle and a red square",
    "A Small, purple STAR!",
]
EDGE_REFS = REFS + [
    ["a red circle", "a circle"],
    ["a yellow circle on the left of a blue star"],
    ["a red circle", "a large red circle above a square"],
    ["a square", "a blue square too"],
    ["a green star", "a large green star left of an orange triangle"],
    ["a small purple star", "there is a purple star"],
]


def pycoco_bleu(hyps, refs):
    m = caption_metrics(hyps, refs, meteor=False)
    return [m[f"bleu_{n}"] for n in range(1, 5)]


def test_sufficient_statistics_reproduce_pycocoevalcap_corpus_bleu():
    stats = bleu_stats(EDGE_HYPS, EDGE_REFS)
    assert stats.shape == (len(EDGE_HYPS), 10)
    assert np.allclose(bleu_from_stats(stats.sum(0)), pycoco_bleu(EDGE_HYPS, EDGE_REFS), rtol=0, atol=1e-9)
    # hypotheses shorter than their closest references: the brevity penalty applies, and which reference length
    # counts matters (closest: 10+6+3+10 = 29 > 25 words; the shortest refs would give 22, no penalty)
    short_hyps = ["a large red circle left of a square", "there is a green star above", "a blue square too",
                  "a purple circle right of a yellow"]
    short_refs = [["a large red circle left of a small blue square", "a red circle"],
                  ["there is a green star above an orange triangle", "a green star above a triangle"],
                  ["a blue square", "a blue square too and more here"],
                  ["a purple circle right of a yellow square and a red star",
                   "a purple circle to the right of a yellow square"]]
    totals = bleu_stats(short_hyps, short_refs).sum(0)
    assert tuple(totals[8:]) == (25, 29)
    assert np.allclose(bleu_from_stats(totals), pycoco_bleu(short_hyps, short_refs), rtol=0, atol=1e-9)


def test_weighted_statistics_equal_pycocoevalcap_on_a_resampled_corpus():
    """A bootstrap resample (images drawn with repetition) scored from counts @ stats is pycocoevalcap's corpus
    BLEU of the corpus with those images repeated."""
    stats = bleu_stats(EDGE_HYPS, EDGE_REFS)
    counts = bootstrap_counts(len(EDGE_HYPS), 3, seed=1)
    for row in counts:
        idx = np.repeat(np.arange(len(EDGE_HYPS)), row.astype(int))
        expected = pycoco_bleu([EDGE_HYPS[i] for i in idx], [EDGE_REFS[i] for i in idx])
        assert np.allclose(bleu_from_stats(row @ stats), expected, rtol=0, atol=1e-9)
    assert np.allclose(resampled_bleu_4(stats, counts), bleu_from_stats(counts @ stats)[:, 3])


def test_bootstrap_counts_resample_every_image_set_with_replacement():
    counts = bootstrap_counts(7, 50, seed=0)
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all() and (counts == 0).any()


# a clearly better and a clearly worse captioner on the same images: a reference of the image vs one of another image
REFS_40 = [[f"a {c} {s} {r} a {c2} {s2}" for r in ("left of", "above", "right of")]
           for c, s, c2, s2 in [(c, s, c2, s2) for c in ("red", "blue") for s in ("circle", "square")
                                for c2 in ("green", "orange", "purple", "yellow", "white") for s2 in ("star", "cross")]]
GOOD = [refs[0] for refs in REFS_40]
BAD = [REFS_40[(i + 17) % len(REFS_40)][1] for i in range(len(REFS_40))]


@functools.cache
def _per_image_cider(hyps: tuple) -> np.ndarray:
    return np.asarray(caption_metrics(list(hyps), REFS_40, meteor=False, per_image=True)["per_image"]["cider"])


def _cis(hyps_a, hyps_b, seed, n_boot=300):
    a, b = bleu_stats(hyps_a, REFS_40), bleu_stats(hyps_b, REFS_40)
    ca, cb = _per_image_cider(tuple(hyps_a)), _per_image_cider(tuple(hyps_b))
    counts = bootstrap_counts(len(REFS_40), n_boot, seed)
    full = lambda s: float(bleu_from_stats(s.sum(0))[3])  # noqa: E731
    bleu = delta_ci(resampled_bleu_4(a, counts), resampled_bleu_4(b, counts), full(a), full(b))
    cider = delta_ci(resampled_mean(ca, counts), resampled_mean(cb, counts), ca.mean(),
                             cb.mean())
    return bleu, cider


def test_paired_bootstrap_of_a_variant_against_itself_is_exactly_zero():
    for ci in _cis(BAD, BAD, seed=0):
        assert (ci["delta"], ci["lo"], ci["hi"]) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_separates_a_clearly_better_variant_and_is_seeded():
    bleu, cider = _cis(BAD, GOOD, seed=0)
    assert bleu["lo"] <= bleu["delta"] <= bleu["hi"] < 0  # worse minus better: the whole interval below 0
    assert cider["lo"] <= cider["delta"] <= cider["hi"] < 0
    assert _cis(BAD, GOOD, seed=0) == (bleu, cider)
    assert _cis(BAD, GOOD, seed=1) != (bleu, cider)


# -- build_report on a fabricated sweep -------------------------------------------------------------------------------

CSV_COLUMNS = ["epoch", "lr-AdamW", "step", "train/loss_epoch", "train/loss_step", "val/bleu_1", "val/bleu_4",
               "val/loss", "val/object_accuracy"]


def _write_run(run_dir, model, family, hyps, refs, keys, image_paths, epochs=3, seed=0, curve_shift=0.0):
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    ckpt = run_dir / "checkpoints" / "best-epoch01.ckpt"
    ckpt.write_bytes(b"")
    test = caption_metrics(hyps, refs, meteor=False)
    test.update(meteor=None, object_accuracy=0.5 if family == "attention" else 0.25, relation_accuracy=0.1)
    metrics = {"model": model, "run_name": f"{model}+lite0-offline", "family": family,
               "encoder": "efficientnet_lite0", "decoder": "transformer" if family == "attention" else "lstm",
               "attention": "mha" if family == "attention" else "none", "data": "shapes", "test": test,
               "caption_prior_bleu_4": 0.219, "best_val_bleu_4": test["bleu_4"], "best_epoch": 1, "epochs": epochs,
               "train_seconds": 12.5, "params_trainable": 123_456, "best_checkpoint": str(ckpt),
               "run_dir": str(run_dir), "seed": seed}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with open(run_dir / "predictions.jsonl", "w") as f:
        for key, path, h, r in zip(keys, image_paths, hyps, refs):
            f.write(json.dumps({"image": key, "image_path": str(path), "hypothesis": h, "references": r}) + "\n")
    # Lightning CSVLogger style: sparse rows (a step row, a validation row, a train-epoch row per epoch)
    with open(run_dir / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerow({"lr-AdamW": 1e-5, "step": 0})
        for e in range(epochs):
            w.writerow({"epoch": e, "step": 10 * e + 5, "train/loss_step": 3.0 - e})
            w.writerow({"epoch": e, "step": 10 * e + 9, "val/bleu_1": 0.5, "val/bleu_4": 0.1 * (e + 1) + curve_shift,
                        "val/loss": 2.0 - 0.2 * e, "val/object_accuracy": 0.3})
            w.writerow({"epoch": e, "step": 10 * e + 9, "train/loss_epoch": 2.5 - 0.3 * e})


@pytest.fixture
def fake_sweep(tmp_path):
    from PIL import Image

    sweep, images = tmp_path / "sweep", tmp_path / "images"
    images.mkdir()
    n = 10
    keys = [f"images/test_{i:06d}.jpg" for i in range(n)]
    paths = []
    for i in range(n):
        paths.append(images / f"test_{i:06d}.jpg")
        Image.new("RGB", (64, 48), (20 * i, 100, 200)).save(paths[-1])
    refs = REFS_40[:n]
    _write_run(sweep / "0_model=dino_lstm", "dino_lstm", "recurrent", BAD[:n], refs, keys, paths)
    _write_run(sweep / "1_model=dino_attention", "dino_attention", "attention", GOOD[:n], refs, keys, paths)
    # same image set in a different order: rows are matched by key
    _write_run(sweep / "2_model=dino_lstm_init", "dino_lstm_init", "recurrent", (GOOD[:5] + BAD[5:n])[::-1],
               refs[::-1], keys[::-1], paths[::-1])
    crashed = sweep / "3_model=resnet_rnn"
    (crashed / ".hydra").mkdir(parents=True)
    (crashed / "train.log").write_text("Traceback ...")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def _fake_caption_module():
    """Stands in for captioner.caption (the same API): a 2-word caption with 2x2 maps per image."""
    from PIL import Image

    class ImageCaptioner:
        def __init__(self, ckpt_path, device="cpu"):
            assert device == "cpu" and ckpt_path.endswith(".ckpt")

        def caption(self, images, attention=False):
            assert attention and all(isinstance(im, Image.Image) for im in images)
            return [{"caption": "a circle", "words": ["a", "circle"], "attention": np.ones((2, 2, 2)) / 4}
                    for _ in images]

    def attention_figure(image, words, maps):
        assert len(words) == len(maps)
        return Image.new("RGB", (64 * len(words), 64), (255, 0, 0))

    return types.SimpleNamespace(ImageCaptioner=ImageCaptioner, attention_figure=attention_figure)


def test_build_report_writes_every_file(fake_sweep, monkeypatch):
    monkeypatch.setitem(sys.modules, "captioner.caption", _fake_caption_module())
    report = build_report(fake_sweep, n_boot=200, seed=0, html_images=4)
    out = fake_sweep / "report"

    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| dino_")]
    assert len(rows) == 3 and "3_model=resnet_rnn" in md  # the crashed run is listed as missing
    best_row = next(r for r in rows if r.startswith("| dino_attention "))
    assert best_row.endswith("| best | best |") and "**" in best_row
    assert "–" in best_row  # METEOR null
    assert "ΔBLEU-4 vs best [95% CI]" in md and "0.219" in md and "loss_curves.png" in md
    for name in ("loss_curves.png", "bleu_curves.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"

    page = (out / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    # 2 figures + 4 photos + 4 attention maps, every one embedded
    assert len(parser.srcs) == 10 and all(s.startswith("data:image/") for s in parser.srcs)
    assert "href=" not in page and "<script" not in page

    data = json.loads((out / "report.json").read_text())
    assert data == json.loads(json.dumps(report)) and data["best"] == "dino_attention"
    assert data["n_test_images"] == 10 and data["missing"][0]["run"] == "3_model=resnet_rnn"
    by_label = {r["label"]: r for r in data["runs"]}
    worse = by_label["dino_lstm"]["delta_vs_best"]["bleu_4"]
    assert worse["lo"] <= worse["delta"] <= worse["hi"] < 0
    assert by_label["dino_attention"]["delta_vs_best"]["bleu_4"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0}
    assert not any(r["notes"] for r in data["runs"])  # predictions reproduce metrics.json's BLEU-4 and CIDEr


def test_report_without_captioner_module_notes_the_missing_maps(fake_sweep, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "captioner.caption", None)  # import fails as if the module did not exist
    build_report(fake_sweep, tmp_path / "out", n_boot=20, html_images=2)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "attention maps skipped" in page
    assert not (fake_sweep / "report").exists()  # --out is respected


def test_different_test_images_and_empty_sweeps_are_clear_errors(fake_sweep, tmp_path, capsys):
    preds = fake_sweep / "2_model=dino_lstm_init" / "predictions.jsonl"
    preds.write_text("\n".join(preds.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ReportError, match="did not predict the same test images"):
        build_report(fake_sweep, n_boot=10)
    empty = tmp_path / "empty"
    (empty / "0_model=x").mkdir(parents=True)
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no finished run" in err and "0_model=x" in err


def test_compare_script_is_the_report_command_line(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "experiments" / "compare.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no finished run" in proc.stderr


def test_one_seed_sweep_shows_no_seed_column_nor_rates_it_did_not_record(fake_sweep):
    build_report(fake_sweep, n_boot=20, html_images=0)
    md = (fake_sweep / "report" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert "seeds" not in header and "±" not in md and "hierarchical" not in md
    assert "object acc." in header and "relation acc." in header  # recorded by the fake runs
    assert "relation rate" not in header and "size acc." not in header  # not recorded: not shown


# -- several seeds per variant ----------------------------------------------------------------------------------------

def _write_metrics_only(run_dir, model, seed, bleu_4, seed_in="metrics", **test):
    """A run with metrics.json only (no predictions, no curves); its seed in metrics.json or, as in runs written
    before train.py recorded it, only in .hydra/config.yaml."""
    (run_dir / ".hydra").mkdir(parents=True)
    metrics = {"model": model, "encoder": "efficientnet_lite0", "decoder": "lstm", "params_trainable": 1000,
               "best_epoch": seed, "train_seconds": 10.0 * seed, "test": {"bleu_4": bleu_4, "cider": 1.0, **test}}
    if seed_in == "metrics":
        metrics["seed"] = seed
    else:
        (run_dir / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nmodel:\n  name: {model}\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n- seed={seed}\n")
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_seed_summary_is_the_mean_and_sample_sd():
    mean, sd, n = seed_summary([0.1, 0.2, 0.3, None, float("nan")])
    assert n == 3 and mean == pytest.approx(0.2, abs=1e-12) and sd == pytest.approx(0.1, abs=1e-12)
    assert seed_summary([0.25]) == (0.25, None, 1) and seed_summary([None]) == (None, None, 0)


def test_runs_of_one_model_over_seeds_are_one_row_with_mean_and_sd(tmp_path):
    sweep = tmp_path / "sweep"
    rates = dict(relation_accuracy=0.9, relation_rate=0.2, relation_correct=0.18, direction_accuracy=0.95,
                 size_rate=0.5, size_accuracy=0.8)
    # job order is not seed order, and one run's seed is only in .hydra/config.yaml
    _write_metrics_only(sweep / "0_model=dino_lstm,seed=3", "dino_lstm", 3, 0.3, **rates)
    _write_metrics_only(sweep / "1_model=dino_lstm,seed=1", "dino_lstm", 1, 0.1, seed_in="config", **rates)
    _write_metrics_only(sweep / "2_model=dino_lstm,seed=2", "dino_lstm", 2, 0.2, **rates)
    _write_metrics_only(sweep / "3_model=dino_attention,seed=1", "dino_attention", 1, 0.5)
    report = build_report(sweep, n_boot=10, html_images=0)
    md = (sweep / "report" / "report.md").read_text()

    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    lstm = next(line for line in md.splitlines() if line.startswith("| dino_lstm |"))
    attention = next(line for line in md.splitlines() if line.startswith("| dino_attention |"))
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in lstm.split("|")[1:-1]]))
    assert cells["seeds"] == "3" and cells["BLEU-4"] == "0.200 ± 0.100" and cells["CIDEr"] == "1.000 ± 0.000"
    assert cells["best epoch"] == "1–3" and cells["train s"] == "20"  # epochs as a range, seconds as a mean
    assert "| 1 |" in attention and "**0.500**" in attention and "± " not in attention  # one seed: the value alone
    # the semantic rates recorded by some run: shown, each accuracy beside its rate, explained in the legend
    for column in ("relation acc. | relation rate | relation correct | direction acc. | size acc. | size rate",):
        assert column in header
    assert cells["relation rate"] == "0.200 ± 0.000" and "stating less" in md and "relation rate:" in md
    assert len(md.split("| dino_lstm ")) == 2  # one row for the three runs

    entry = {r["label"]: r for r in report["runs"]}["dino_lstm"]
    assert entry["n_seeds"] == 3 and entry["seeds"] == [1, 2, 3]
    assert entry["test"]["bleu_4"] == pytest.approx(0.2) and entry["test_sd"]["bleu_4"] == pytest.approx(0.1)
    assert [r["seed"] for r in entry["seed_runs"]] == [1, 2, 3]
    assert report["best"] == "dino_attention"  # by mean test BLEU-4: 0.5 > 0.2


def _variant(label, hyps_per_seed):
    runs = []
    for i, hyps in enumerate(hyps_per_seed):
        run = Run(dir=None, metrics={"test": {}}, label=label, seed=i)
        run.stats, run.cider = bleu_stats(hyps, REFS_40), _per_image_cider(tuple(hyps))
        runs.append(run)
    return Variant(label=label, runs=runs)


def test_hierarchical_bootstrap_with_one_seed_is_the_paired_bootstrap_exactly():
    bad, good = _variant("bad", [BAD]), _variant("good", [GOOD])
    for seed in (0, 1):
        deltas = hierarchical_deltas([bad, good], good, len(REFS_40), 300, seed)
        assert (deltas["bad"]["bleu_4"], deltas["bad"]["cider"]) == _cis(BAD, GOOD, seed=seed)  # bit for bit
        assert deltas["good"]["bleu_4"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0}


def _mixed(n_good):
    return GOOD[:n_good] + BAD[n_good:]


def test_seed_variance_widens_the_interval():
    best = _variant("good", [GOOD, GOOD, GOOD])
    same = _variant("same", [_mixed(20)] * 3)
    varied = _variant("varied", [_mixed(2), _mixed(20), _mixed(38)])  # about the same mean, far apart seeds
    deltas = hierarchical_deltas([same, varied, best], best, len(REFS_40), 400, seed=0)
    width = {k: {m: d[m]["hi"] - d[m]["lo"] for m in d} for k, d in deltas.items()}
    assert width["varied"]["bleu_4"] > 2 * width["same"]["bleu_4"]
    assert width["varied"]["cider"] > 2 * width["same"]["cider"]
    # identical seeds add nothing: the interval of three copies is the one-seed (paired) interval
    one = hierarchical_deltas([_variant("same", [_mixed(20)]), best], best, len(REFS_40), 400, seed=0)["same"]
    for m in ("bleu_4", "cider"):
        assert deltas["same"][m] == pytest.approx(one[m], abs=1e-12)


@pytest.fixture
def seed_sweep(tmp_path):
    """Two variants x 3 seeds on 20 test images: one clearly better on every seed, seeds differing a little."""
    from PIL import Image

    sweep, images = tmp_path / "seeds", tmp_path / "images"
    images.mkdir()
    n = 20
    keys = [f"images/test_{i:06d}.jpg" for i in range(n)]
    paths = [images / f"test_{i:06d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        Image.new("RGB", (32, 32), (10 * i, 80, 160)).save(path)
    refs = REFS_40[:n]
    job = 0
    for seed, worse_images in zip((1, 2, 3), (0, 2, 4)):  # each seed of the good variant misses a few images
        good = [BAD[i] if i < worse_images else GOOD[i] for i in range(n)]
        bad = [GOOD[i] if i < worse_images else BAD[i] for i in range(n)]
        _write_run(sweep / f"{job}_model=dino_attention,seed={seed}", "dino_attention", "attention", good, refs,
                   keys, paths, seed=seed, curve_shift=0.01 * seed)
        _write_run(sweep / f"{job + 1}_model=dino_lstm,seed={seed}", "dino_lstm", "recurrent", bad, refs, keys,
                   paths, seed=seed, curve_shift=-0.01 * seed)
        job += 2
    return sweep


def test_a_variant_better_on_every_seed_holds_up_and_curves_get_a_band(seed_sweep, monkeypatch):
    monkeypatch.setitem(sys.modules, "captioner.caption", _fake_caption_module())
    report = build_report(seed_sweep, n_boot=300, seed=0, html_images=2)
    out = seed_sweep / "report"
    by_label = {r["label"]: r for r in report["runs"]}
    assert list(by_label) == ["dino_lstm", "dino_attention"] and report["best"] == "dino_attention"
    assert "hierarchical" in report["interval"]
    worse = by_label["dino_lstm"]
    assert worse["n_seeds"] == 3 and worse["holds_up"] == {"bleu_4": True, "cider": True}
    assert worse["delta_vs_best"]["bleu_4"]["hi"] < 0 and worse["delta_vs_best"]["cider"]["hi"] < 0
    # the point estimate is the difference of the seed means on the full test set
    assert worse["delta_vs_best"]["bleu_4"]["delta"] == pytest.approx(
        worse["test"]["bleu_4"] - by_label["dino_attention"]["test"]["bleu_4"], abs=1e-9)
    assert by_label["dino_attention"]["holds_up"] == {"bleu_4": False, "cider": False}

    md = (out / "report.md").read_text()
    assert "hold up (95% interval excludes 0): dino_lstm: ΔBLEU-4, ΔCIDEr." in md
    assert "hierarchical bootstrap" in md and " ± " in md and "min–max over seeds" in md
    assert next(line for line in md.splitlines() if line.startswith("| dino_attention |")).endswith(
        "| best | best |")

    # the curves: mean over seeds as the line, min-max across seeds as the band, in the figure and report.json
    assert report["curve_band"] == "min–max over seeds"
    first = report["curves"]["dino_attention"]["val/bleu_4"][0]
    assert first["n"] == 3 and first["mean"] == pytest.approx(0.12) and (first["min"], first["max"]) == (
        pytest.approx(0.11), pytest.approx(0.13))
    for name in ("loss_curves.png", "bleu_curves.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"

    # report.html: one run's captions per variant, its first seed, named
    page = (out / "report.html").read_text()
    assert "dino_lstm (seed 1)" in page and "dino_attention (seed 1)" in page and "(seed 2)" not in page
    assert "first seed" in page
    parser = _Images()
    parser.feed(page)
    assert len(parser.srcs) == 2 + 2 + 2 and all(s.startswith("data:image/") for s in parser.srcs)
