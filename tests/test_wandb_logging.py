"""What a run shows in W&B (captioner/wandb_logging.py): the mode WANDB_MODE asks for, the per-epoch validation
samples, and a summary the runs table compares variants by. The end-to-end test reads what W&B 0.31 writes for an
offline run: the run's records in <run dir>/wandb/offline-run-*/run-*.wandb (there is no wandb-summary.json
offline), tables under files/media/table/, logged images under files/media/images/, and a table's own images as a
`run_table` artifact staged under $WANDB_DATA_DIR until `wandb sync`."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from captioner.config import compose
from captioner.errors import ConfigError
from captioner.training import check_config
from captioner.wandb_logging import ValidationSamples, attention_images, run_summary, wandb_logger
from conftest import run_here


def composed_mode(monkeypatch, env_value):
    """logger.wandb.mode of `debug=tiny logger=wandb` (the e2e tests' composition) under WANDB_MODE=env_value."""
    if env_value is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_value)
    cfg = compose(["debug=tiny", "logger=wandb"])
    assert set(cfg.logger) == {"csv", "wandb"}  # logger=wandb after debug=tiny wins over its logger=csv
    return cfg.logger.wandb.mode


@pytest.mark.parametrize("env_value, built", [(None, "offline"), ("", "offline"), ("offline", "offline"),
                                              ("dryrun", "offline"), ("online", "online"), ("ONLINE", "online"),
                                              ("disabled", None)])
def test_wandb_mode_decides_the_logger(env_value, built, monkeypatch, tmp_path):
    mode = composed_mode(monkeypatch, env_value)
    before = os.environ.get("WANDB_MODE")
    logger = wandb_logger(mode=mode, project="captioner", save_dir=str(tmp_path), log_model=False)
    if built is None:
        assert logger is None  # no W&B run at all
        return
    # the mode goes to wandb.init; nothing is contacted (no .experiment), and WANDB_MODE is left as it was
    assert isinstance(logger, WandbLogger) and logger._wandb_init["mode"] == built
    assert not logger._offline and logger._experiment is None and os.environ.get("WANDB_MODE") == before


def test_a_wandb_mode_that_cannot_work_is_refused_with_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match=r"logger\.wandb\.mode='onlin' \(from WANDB_MODE\).*online \| offline"):
        wandb_logger(mode=composed_mode(monkeypatch, "onlin"))
    with pytest.raises(ConfigError, match=r"logger\.wandb\.mode='onlin'"):  # by train.py, before anything is built
        check_config(compose(["debug=tiny", "logger=wandb"]))
    with pytest.raises(ConfigError, match="WANDB_MODE=online.*log_model=false"):
        wandb_logger(mode="offline", log_model=True)
    with pytest.raises(ConfigError, match="logger.wandb.offline is no longer read.*WANDB_MODE"):
        wandb_logger(mode="offline", offline=True)
    with pytest.raises(ConfigError, match=r"callbacks\.val_samples\.n=-1"):
        ValidationSamples(n=-1)


def test_the_old_wandb_offline_variable_is_named_as_no_longer_read(monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_OFFLINE", "false")  # what the docs said before WANDB_MODE decided
    with caplog.at_level("WARNING", logger="captioner.wandb_logging"):
        logger = wandb_logger(mode=compose(["logger=wandb"]).logger.wandb.mode, save_dir=str(tmp_path))
    assert logger._wandb_init["mode"] == "offline" and "WANDB_MODE=online" in caplog.text


def test_the_summary_holds_the_test_metrics_and_what_tells_variants_apart():
    metrics = {"model": "dino_sat", "family": "attention", "stage": "scst", "params_trainable": 1234,
               "best_val_bleu_4": 0.25, "best_val_cider": None, "run_dir": "/tmp/x", "data_stats": {"train": 3},
               "test": {"bleu_4": 0.2, "cider": 0.5, "meteor": None, "relation_correct": 3}}
    assert run_summary(metrics) == {"test/bleu_4": 0.2, "test/cider": 0.5, "test/relation_correct": 3,
                                    "model": "dino_sat", "family": "attention", "stage": "scst",
                                    "params_trainable": 1234, "best_val_bleu_4": 0.25}


def test_attention_figures_of_captions_of_any_length_share_one_size(tmp_path):
    import numpy as np

    path = tmp_path / "image.png"
    Image.new("RGB", (64, 48), "red").save(path)
    captions = [(path, ["a", "circle"], np.random.rand(2, 7, 7)), (path, "a big red circle on a blue square".split(),
                                                                   np.random.rand(8, 7, 7))]
    images = attention_images(captions)
    assert [im._caption for im in images] == ["a circle", "a big red circle on a blue square"]
    assert len({im.image.size for im in images}) == 1  # W&B shows a list of mixed sizes distorted


# -- reading an offline run ---------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte header; 32 KiB blocks of chunks, each with
    a 7-byte header: checksum, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B log this test can read"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_run(run_dir: Path) -> tuple[Path, list]:
    runs = list(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1, files
    return runs[0], list(wandb_records(files[0]))


def summary_of(records) -> dict:
    """The run's final summary: its summary records' top-level updates, in order."""
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for u in r.summary.update:
                key = u.key or (u.nested_key[0] if len(u.nested_key) == 1 else None)
                if key:
                    summary[key] = json.loads(u.value_json)
    return summary


@pytest.mark.e2e
def test_an_offline_run_holds_the_samples_of_every_epoch_and_a_comparable_summary(tiny_root, tmp_path):
    run_dir, data_dir = tmp_path / "run", tmp_path / "wandb-data"
    r = run_here(["train.py", "model=dino_attention", "trainer.max_epochs=2", "debug=tiny", "logger=wandb",
                 "callbacks.val_samples.n=4", f"hydra.run.dir={run_dir}"], tiny_root,
                env={"WANDB_MODE": "offline", "WANDB_DATA_DIR": data_dir})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "to W&B:" not in r.stdout + r.stderr, r.stderr[-3000:]  # no W&B hiccup was swallowed
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run, records = offline_run(run_dir)

    # one val/samples table per epoch, of the same 4 images: epoch, references, caption
    tables = [json.loads(p.read_text()) for p in sorted(run.glob("files/media/table/val/samples_*.table.json"),
                                                        key=lambda p: int(p.name.split("_")[1]))]
    assert [t["columns"] for t in tables] == [["epoch", "image", "references", "caption"]] * 2
    assert [[row[0] for row in t["data"]] for t in tables] == [[0] * 4, [1] * 4]
    assert all(row[2].count(" | ") == 4 and row[3] for t in tables for row in t["data"])  # 5 references each
    assert [row[2] for row in tables[0]["data"]] == [row[2] for row in tables[1]["data"]]  # the same images
    # the tables' images: the val images, in a run_table artifact per epoch, staged in WANDB_DATA_DIR for sync
    staged = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
              and r.artifact.type == "run_table" and "valsamples" in r.artifact.name]
    assert len(staged) == 2
    for artifact in staged:
        images = [c for c in artifact.manifest.contents if c.path.endswith(".jpg")]
        assert sorted(Path(c.path).name for c in images) == [f"val_{i:06d}.jpg" for i in range(4)]
        assert all(Path(c.local_path).is_file() and str(data_dir) in c.local_path for c in images)
    # the per-word attention figures of those 4 captions, each epoch, in the run dir
    figures = list(run.glob("files/media/images/val/attention_maps_*.png"))
    assert len(figures) == 8 and all(p.stat().st_size > 1000 for p in figures)
    for step in {p.name.split("_")[2] for p in figures}:  # one size per epoch's list, or W&B distorts it
        assert len({Image.open(p).size for p in figures if p.name.split("_")[2] == step}) == 1

    # the summary: the runs table's columns
    summary = summary_of(records)
    assert summary["params_trainable"] == metrics["params_trainable"] > 10_000
    assert (summary["model"], summary["family"], summary["stage"]) == ("dino_attention", "attention", "xe")
    assert summary["best_val_bleu_4"] == pytest.approx(metrics["best_val_bleu_4"])
    for name in ("bleu_4", "cider", "rouge_l", "object_accuracy"):
        assert summary[f"test/{name}"] == pytest.approx(metrics["test"][name])
