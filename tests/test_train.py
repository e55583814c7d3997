"""`python train.py` and the five-variant multirun as a user runs them (tiny shapes world, 1 epoch)."""

import json
import re

import pytest

from conftest import REPO, run_cli, run_here

TINY = ["debug=tiny", "trainer.max_epochs=2", "metrics.meteor=true"]
TEST_KEYS = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "meteor", "object_accuracy",
             "relation_accuracy"}


def run_train(*args, root, timeout=600, wandb_mode="disabled", run=run_here):
    return run(["train.py", *args], root, timeout=timeout, env={"WANDB_MODE": wandb_mode})


def check_metrics(path, model):
    m = json.loads(path.read_text())
    assert m["model"] == model and m["encoder"] == "efficientnet_lite0"
    assert TEST_KEYS <= set(m["test"])
    for key in TEST_KEYS - {"meteor"}:
        assert 0.0 <= m["test"][key] <= (10.0 if key == "cider" else 1.0), key
    assert m["test"]["meteor"] is None or 0 <= m["test"]["meteor"] <= 1
    assert m["epochs"] == 2 and m["best_epoch"] in (0, 1) and m["train_seconds"] > 0
    assert m["params_trainable"] > 10_000 and 0 <= m["best_val_bleu_4"] <= 1
    return m


@pytest.mark.e2e
def test_single_run_writes_everything_into_its_run_dir(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    r = run_train(*TINY, f"hydra.run.dir={run_dir}", root=tiny_root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test BLEU-4" in r.stdout and str(run_dir) in r.stdout
    m = check_metrics(run_dir / "metrics.json", "dino_lstm_init")
    assert m["run_name"].endswith("lite0-offline")  # the offline encoder swap is visible in the run name
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len(list((run_dir / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    assert (run_dir / "csv" / "metrics.csv").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 10 and {"image", "hypothesis", "references"} <= set(json.loads(lines[0]))
    assert not (REPO / "outputs").exists() or not any((REPO / "outputs").glob(f"**/{run_dir.name}"))


@pytest.mark.e2e
def test_multirun_over_the_five_variants(tiny_root, tmp_path):
    models = ["resnet_rnn", "dino_rnn", "dino_lstm", "dino_lstm_init", "dino_attention"]
    sweep = tmp_path / "sweep"
    # as `make demo` runs it: two jobs side by side (hydra/launcher=parallel), the longest first
    r = run_train("-m", "hydra/launcher=parallel", f"model={','.join(models[::-1])}", *TINY, "metrics.meteor=false",
                  f"hydra.sweep.dir={sweep}", "logger=wandb", root=tiny_root, timeout=900, wandb_mode="offline",
                  run=run_cli)  # the jobs run in worker processes, which import the job function: a real __main__
    assert r.returncode == 0, r.stderr[-3000:]
    found = {json.loads(p.read_text())["model"]: p for p in sweep.glob("*/metrics.json")}
    assert set(found) == set(models)
    params = {m: check_metrics(p, m)["params_trainable"] for m, p in found.items()}
    assert params["dino_lstm"] != params["dino_rnn"]  # really different decoders
    # each job has its own offline W&B run (not all logging into the first job's run), in one shared group
    wandb_runs = {p.parent.parent.parent.name: p.parent.name for p in sweep.glob("*/wandb/offline-run-*/files")}
    assert len(wandb_runs) == 5 and len(set(wandb_runs.values())) == 5

    # the comparison report over this sweep, as `make report` runs it
    r = run_here(["experiments/compare.py", sweep, "--bootstrap", "200", "--html-images", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = sweep / "report"
    md = (report / "report.md").read_text()
    assert all(f"| {m} |" in md for m in models) and "| best | best |" in md
    rows = [md.index(f"| {m} |") for m in models]
    assert rows == sorted(rows)  # the report lists the variants by number, not in the sweep's order
    assert (report / "loss_curves.png").stat().st_size > 0 and (report / "bleu_curves.png").stat().st_size > 0
    page = (report / "report.html").read_text()
    srcs = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(srcs) >= 2 + 3 and all(s.startswith("data:image/") for s in srcs)  # figures + test images
    assert len(json.loads((report / "report.json").read_text())["runs"]) == 5


def test_precision_auto_follows_the_hardware(monkeypatch):
    import captioner.config as config

    monkeypatch.setattr(config, "cpu_has_bf16", lambda: True)
    assert config.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: False)
    assert config.resolve_precision("auto", "cpu") == "32-true"
    assert config.resolve_precision("16-mixed", "cpu") == "16-mixed"  # explicit values pass through
    with pytest.raises(ValueError, match="trainer.precision"):
        config.resolve_precision("auto", "tpu")


def test_extraction_workers_auto_uses_only_idle_cores(monkeypatch):
    import captioner.config as config

    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(config.torch, "get_num_threads", lambda: 16)
    assert config.resolve_extraction_workers("auto", "cpu") == 0  # every core runs the forward's threads
    monkeypatch.setattr(config.torch, "get_num_threads", lambda: 14)
    assert config.resolve_extraction_workers("auto", "cpu") == 2
    monkeypatch.setattr(config.torch, "get_num_threads", lambda: 1)
    assert config.resolve_extraction_workers("auto", "cpu") == 4  # capped: decoding is ~10x cheaper than a forward
    assert config.resolve_extraction_workers("auto", "cuda") == 8
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0})
    assert config.resolve_extraction_workers("auto", "cuda") == 1
    assert config.resolve_extraction_workers(3, "cpu") == 3  # an explicit count passes through
    assert config.compose([]).features.num_workers == "auto"


@pytest.mark.e2e
def test_a_run_gives_the_same_numbers_whether_or_not_it_built_the_cache(tmp_path, monkeypatch):
    """The first run of a fresh root builds the world and its feature cache (running the encoder's random init);
    the second finds them built. Both must train the same model: same losses, same metrics, same captions. So must
    a third whose features are held in memory (loader.resident=true): the same batches, gathered instead of read."""
    from conftest import run_script

    monkeypatch.setenv("CAPTIONER_ROOT", str(tmp_path / "root"))
    runs = {"builds": [], "reuses": [], "resident": ["loader.resident=true"]}
    tables = []
    for name, extra in runs.items():
        status, err = run_script("train.py", ["debug=tiny", "model=dino_lstm", f"hydra.run.dir={tmp_path / name}",
                                              *extra])
        assert status == 0, err[-2000:]
        rows = (tmp_path / name / "csv" / "metrics.csv").read_text().splitlines()
        tables.append(rows)
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) > 2
    captions = [[json.loads(line)["hypothesis"] for line in (tmp_path / n / "predictions.jsonl").open()]
                for n in runs]
    assert captions[0] == captions[1] == captions[2]
