"""The real-data path end to end, as a user runs it, on the realistic Flickr8k-format fixture (real photos of mixed
sizes and aspect ratios, human-style captions with capitals, punctuation and rare words, messy lines): train ->
test -> eval.py -> captioner-caption, and the numbers checked against the official COCO caption evaluation."""

import json
import shutil

import pytest

from conftest import run_here

# The recipe of the published Flickr8k scores, with the one encoder that works offline named on purpose; float32
# throughout, so that the test, eval.py and captioner-caption (which decodes in float32) decode alike
RECIPE = ["experiment=flickr8k", "encoder=efficientnet_lite0", "model=dino_attention", "trainer.max_epochs=3",
          "text.min_word_count=2", "logger=csv", "features.num_workers=0", "trainer.precision=32-true"]


@pytest.fixture(scope="module")
def real_run(realistic_flickr8k, tmp_path_factory):
    """A short dino_attention run of the flickr8k recipe on the fixture: (work root, run dir, metrics.json)."""
    root = tmp_path_factory.mktemp("realistic")
    run_dir = root / "run"
    r = run_here(["train.py", *RECIPE, f"data.root={realistic_flickr8k}", f"hydra.run.dir={run_dir}"], root)
    assert r.returncode == 0, r.stderr[-4000:]
    return root, run_dir, json.loads((run_dir / "metrics.json").read_text())


def _predictions(folder):
    return [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]


def _official(predictions):
    """pycocoevalcap's own pipeline (its PTBTokenizer, then its scorers) on a run's predictions.jsonl."""
    from test_metrics import official_scores

    return official_scores([p["hypothesis"] for p in predictions], [p["references"] for p in predictions])


def test_the_recipe_trains_the_model_named_on_the_official_split(real_run, realistic_flickr8k):
    _, run_dir, m = real_run
    assert m["model"] == "dino_attention" and m["encoder"] == "efficientnet_lite0" and m["data"] == "flickr8k"
    from captioner.data.formats import read_flickr8k

    test_keys = {r.key for r in read_flickr8k(realistic_flickr8k).split("test")}
    assert {p["image"] for p in _predictions(run_dir)} == test_keys
    ckpt = __import__("torch").load(m["best_checkpoint"], map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["decode"]["beam_size"] == 3 and hp["decode"]["suppress_unk"]
    assert hp["encoder"]["resize"] == "squash"  # the whole photo reaches the encoder, and inference knows it
    hyps = [p["hypothesis"] for p in _predictions(run_dir)]
    assert "<unk>" in hp["vocab"]["itos"] and not any("<unk>" in h for h in hyps)  # decode.suppress_unk
    assert all(h.split() for h in hyps)  # decode.min_len=1 holds under beam search (and greedy, test_decoding)


def test_two_training_seeds_share_one_test_set(realistic_flickr8k, tmp_path):
    """The fixture as the common CSV copy (no split lists, so a seeded split): seed=0 and seed=3 give one split."""
    from omegaconf import OmegaConf

    from captioner.config import compose
    from captioner.data import load_dataset
    from captioner.data.formats import read_flickr8k

    rows = ["image,caption"] + [f'{r.image.name},"{c.replace(chr(34), chr(34) * 2)}"'
                                for r in read_flickr8k(realistic_flickr8k).records for c in r.captions]
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "Images").symlink_to(realistic_flickr8k / "Flicker8k_Dataset")
    splits = []
    for seed in (0, 3):
        cfg = compose(["data=flickr8k_csv", f"data.root={tmp_path}", f"seed={seed}"])
        ds = load_dataset(OmegaConf.to_container(cfg.data, resolve=True), progress=False)
        splits.append({s: sorted(r.key for r in ds.split(s)) for s in ("train", "val", "test")})
    assert splits[0] == splits[1] and len(splits[0]["test"]) >= 3


@pytest.mark.skipif(shutil.which("java") is None, reason="the official PTBTokenizer and METEOR need Java")
def test_test_metrics_equal_the_official_coco_evaluation(real_run):
    _, run_dir, m = real_run
    preds = _predictions(run_dir)
    assert any(any(c in r for c in ".,'\"()-") for p in preds for r in p["references"])  # real punctuation
    official = _official(preds)
    for name, value in official.items():
        assert m["test"][name] == pytest.approx(value, abs=1e-4), name


def test_eval_with_the_python_tokenizer_gives_the_same_numbers_and_val_matches_selection(real_run,
                                                                                          realistic_flickr8k):
    """eval.py on the best checkpoint reproduces the training test metrics with the pure-Python PTB twin; on the
    val split it reproduces the validation BLEU-4 the checkpoint was selected on (val and test score alike)."""
    root, run_dir, m = real_run
    common = ["eval.py", f"ckpt_path={m['best_checkpoint']}", "data=flickr8k", f"data.root={realistic_flickr8k}",
              "decode.beam_size=3", "logger=csv", "features.num_workers=0", "trainer.precision=32-true"]
    out = root / "eval-python"
    r = run_here([*common, "metrics.tokenizer=python", f"hydra.run.dir={out}"], root)
    assert r.returncode == 0, r.stderr[-4000:]
    ev = json.loads((out / "metrics.json").read_text())
    assert [p["hypothesis"] for p in _predictions(out)] == [p["hypothesis"] for p in _predictions(run_dir)]
    for name, value in m["test"].items():
        if value is not None:
            assert ev["test"][name] == pytest.approx(value, abs=1e-4), name

    val = root / "eval-val"
    r = run_here([*common, "split=val", "metrics.meteor=false", f"hydra.run.dir={val}"], root)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((val / "metrics.json").read_text())["test"]["bleu_4"] == \
        pytest.approx(m["best_val_bleu_4"], abs=1e-6)


def test_caption_cli_captions_the_photos_as_the_test_did(real_run):
    root, run_dir, m = real_run
    preds = _predictions(run_dir)
    r = run_here(["-m", "captioner.caption", "--ckpt", m["best_checkpoint"], "--json", "--beam-size", "3",
              *[p["image_path"] for p in preds]], root)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {json.loads(line)["file"]: json.loads(line)["caption"] for line in r.stdout.splitlines()}
    assert got == {p["image_path"]: p["hypothesis"] for p in preds}


def test_a_real_data_command_never_silently_swaps_the_encoder(realistic_flickr8k, tmp_path):
    """Without a recipe, the default experiment=shapes_offline would put EfficientNet-Lite0 under dino_attention:
    refused, with the ways out; with the recipe the model keeps its own encoder."""
    from captioner.config import compose
    from captioner.training import check_config

    r = run_here(["train.py", "data=flickr8k", f"data.root={realistic_flickr8k}", "model=dino_attention", "logger=csv",
              f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert r.returncode != 0
    assert "experiment=flickr8k" in r.stderr and "experiment=none" in r.stderr and "Traceback" not in r.stderr[-600:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    for model, encoder in (("dino_attention", "dinov2_vits14"), ("resnet_rnn", "resnet50")):
        for recipe in ("flickr8k", "flickr30k", "coco"):
            cfg = compose([f"experiment={recipe}", f"model={model}"])
            check_config(cfg)
            assert cfg.encoder.name == encoder and cfg.decode.beam_size == 3, (recipe, model)
        assert compose(["experiment=none", "data=flickr8k", f"model={model}"]).encoder.name == encoder
