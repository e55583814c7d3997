"""A training run's own files against what can happen to them (issue 17, "Data loss"): a resume that fails, a full
disk while a checkpoint is saved, links planted at the names of the files a run writes, and resumes across which
the CSV history and `train_seconds` must add up. See captioner/run_files.py."""

import csv
import json
import os
import sys
from collections import Counter

import pytest
import torch

from captioner.report import build_report
from conftest import file_size_limit, run_cli, run_here, run_script
from test_compare import fake_sweep  # noqa: F401 (a fixture, a small fabricated sweep)

TINY = ["debug=tiny", "model=dino_lstm_init", "trainer.log_every_n_steps=1"]
# Above every file a tiny run writes but its checkpoints (~35 MB): a checkpoint save is the write that fails.
FILE_SIZE_LIMIT = 4 << 20
# train.py with writes beyond FILE_SIZE_LIMIT failing with EFBIG, as on a full disk (SIGXFSZ would kill instead)
FULL_DISK_TRAIN = f"""
import resource, runpy, signal, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_SIZE_LIMIT}, {FILE_SIZE_LIMIT}))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def _train(root, run_dir, *extra, full_disk=False):
    if full_disk:  # the file size limit is the process's: a process of its own
        return run_cli(["-c", FULL_DISK_TRAIN, *TINY, f"hydra.run.dir={run_dir}", *extra], root)
    return run_here(["train.py", *TINY, f"hydra.run.dir={run_dir}", *extra], root)


def _one_error_line(r):
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


def _history(path):
    """(epoch, step, metric) of every cell metrics.csv holds, counted."""
    counts = Counter()
    for row in csv.DictReader(open(path)):
        epoch = int(row["epoch"]) if row["epoch"] else None
        counts.update((epoch, int(row["step"]), key) for key, value in row.items()
                      if value and key not in ("epoch", "step"))
    return counts


def _clock(ckpt):
    return torch.load(ckpt, weights_only=True, map_location="cpu")["callbacks"]["TrainingClock"]["seconds"]


def _refused_here(root, run_dir, *extra):
    """The one `error:` line of a train.py run refused in this process (no interpreter start per refusal)."""
    status, err = run_script("train.py", [*TINY, f"hydra.run.dir={run_dir}", *extra],
                             env={"CAPTIONER_ROOT": str(root)})
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.mark.e2e
def test_a_runs_files_survive_a_failed_resume_a_full_disk_and_planted_links(tiny_root, tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    r = _train(tiny_root, run, "trainer.max_epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    history, last = run / "csv" / "metrics.csv", run / "checkpoints" / "last.ckpt"
    first = {"history": history.read_bytes(), "hparams": (run / "csv" / "hparams.yaml").read_bytes(),
             "last": last.read_bytes(), "seconds": json.loads((run / "metrics.json").read_text())["train_seconds"],
             "clock": _clock(last)}
    assert 0 < first["clock"] <= first["seconds"]

    # a resume from a truncated last.ckpt fails with one message, and the run's history is left byte for byte
    last.write_bytes(first["last"][: len(first["last"]) // 2])
    error = _refused_here(tiny_root, run, "trainer.max_epochs=3", "ckpt_path=last")
    assert str(last) in error
    assert history.read_bytes() == first["history"]
    last.write_bytes(first["last"])

    # resumes refused before training: other model settings than the checkpoint's, a checkpoint without its
    # training state (weights only); the history is untouched again
    error = _refused_here(tiny_root, run, "trainer.max_epochs=3", "ckpt_path=last", "decoder.hidden_dim=64")
    assert str(last) in error and "decoder" in error and "same model/decoder/encoder/data settings" in error
    weights_only = tmp_path / "weights-only.ckpt"
    stripped = torch.load(last, weights_only=True, map_location="cpu")
    del stripped["optimizer_states"]
    torch.save(stripped, weights_only)
    error = _refused_here(tiny_root, run, "trainer.max_epochs=3", f"ckpt_path={weights_only}")
    assert str(weights_only) in error and "no training state (optimizer_states missing)" in error
    assert history.read_bytes() == first["history"]

    # a full disk while the next epoch's checkpoint is saved: one message naming it, nothing truncated left under
    # its name (none, or the previous whole file), last.ckpt still the previous one, the history still there
    error = _one_error_line(_train(tiny_root, run, "trainer.max_epochs=3", "ckpt_path=last", full_disk=True))
    named = error.split()[1].rstrip(":")
    assert named.startswith(str(run / "checkpoints")) and named.endswith(".ckpt") and "too large" in error
    assert not os.path.exists(named) or torch.load(named, weights_only=True, map_location="cpu")
    assert last.read_bytes() == first["last"]
    assert not list((run / "checkpoints").glob(".*.tmp"))  # no temp file left behind either
    trained = _of_epochs(_history_of_bytes(first["history"], tmp_path), 0, 1)
    assert _of_epochs(_history(history), 0, 1) == trained

    # links planted at the names a run writes or deletes: replaced or removed, what they point at never touched
    victims = {name: outside / name for name in ("hparams.yaml", "best-epoch02.ckpt", "best.ckpt")}
    for victim in victims.values():
        victim.write_bytes(b"not the run's to change")
    (run / "csv" / "hparams.yaml").unlink()
    (run / "csv" / "hparams.yaml").symlink_to(victims["hparams.yaml"])
    (run / "checkpoints" / "best-epoch02.ckpt").symlink_to(victims["best-epoch02.ckpt"])
    best = next((run / "checkpoints").glob("best-epoch0[01].ckpt"))  # ModelCheckpoint deletes it on a new best
    victims["best.ckpt"].write_bytes(best.read_bytes())
    best.unlink()
    best.symlink_to(victims["best.ckpt"])
    kept = {name: victim.read_bytes() for name, victim in victims.items()}

    # the resume that works: every epoch once in the history, the training clock over both processes
    r = _train(tiny_root, run, "trainer.max_epochs=3", "ckpt_path=last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {name: victim.read_bytes() for name, victim in victims.items()} == kept
    hparams = run / "csv" / "hparams.yaml"
    assert not hparams.is_symlink() and "max_epochs: 3" in hparams.read_text()  # this command's config
    counts = _history(history)
    assert max(counts.values()) == 1
    for epoch in (0, 1, 2):
        assert {(epoch, key) for e, _, key in counts if e == epoch} >= \
            {(epoch, "val/loss"), (epoch, "val/bleu_4"), (epoch, "train/loss_epoch"), (epoch, "train/loss_step")}
    assert sum(1 for e, _, key in counts if key == "lr-AdamW") == 3  # one per epoch
    assert _of_epochs(counts, 0, 1) == trained
    seconds = json.loads((run / "metrics.json").read_text())["train_seconds"]
    assert seconds >= first["seconds"] and seconds > first["clock"] and _clock(last) >= first["clock"]


def _of_epochs(counts, *epochs):
    return {cell: n for cell, n in counts.items() if cell[0] in epochs}


def _history_of_bytes(data, tmp_path):
    copy = tmp_path / "history-copy.csv"
    copy.write_bytes(data)
    return _history(copy)


# -- the pieces, in process -------------------------------------------------------------------------------------

def test_checkpoints_are_written_whole_or_not_at_all_and_never_through_a_link(tmp_path):
    from captioner.errors import DiskFullError
    from captioner.run_files import AtomicCheckpointIO

    io, ckpt, victim = AtomicCheckpointIO(), tmp_path / "ckpts" / "best.ckpt", tmp_path / "victim"
    small, big = {"w": torch.zeros(10)}, {"w": torch.zeros(1 << 20)}  # 4 MB of float32
    io.save_checkpoint(small, ckpt)
    before = ckpt.read_bytes()
    with file_size_limit(1 << 20), pytest.raises(DiskFullError, match=f"{ckpt}: could not be written"):
        io.save_checkpoint(big, ckpt)
    assert ckpt.read_bytes() == before and os.listdir(ckpt.parent) == ["best.ckpt"]  # no temp file left

    victim.write_bytes(b"keep")
    ckpt.unlink()
    ckpt.symlink_to(victim)
    io.save_checkpoint(small, ckpt)
    assert not ckpt.is_symlink() and victim.read_bytes() == b"keep"
    assert torch.equal(torch.load(ckpt, weights_only=True)["w"], small["w"])
    ckpt.unlink()
    ckpt.symlink_to(victim)
    io.remove_checkpoint(ckpt)
    assert not ckpt.is_symlink() and not ckpt.exists() and victim.read_bytes() == b"keep"
    io.remove_checkpoint(ckpt)  # already gone: nothing to do


def _logger(run_dir):
    from captioner.run_files import RunHistoryLogger

    return RunHistoryLogger(save_dir=run_dir, name="csv", version="")


def _write_history(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "lr-AdamW", "step", "train/loss_step", "val/loss"])
        writer.writeheader()
        writer.writerows(rows)


# an epoch of 4 steps: the learning rate at its first step, a row per step, the validation at its last one
HISTORY = [row for e in range(3) for row in (
    {"lr-AdamW": 0.1 / (e + 1), "step": 4 * e},
    *({"epoch": e, "step": 4 * e + i, "train/loss_step": 3.0 - e} for i in range(4)),
    {"epoch": e, "step": 4 * e + 3, "val/loss": 2.0 - e})][:-3]  # the run was killed during epoch 2


def test_the_history_is_untouched_until_training_restarts(tmp_path):
    """A resume that fails after the logger started (Lightning's CSVLogger deleted metrics.csv right then)."""
    path = tmp_path / "csv" / "metrics.csv"
    _write_history(path, HISTORY)
    before = path.read_bytes()
    logger = _logger(tmp_path)
    logger.log_hyperparams({"trainer": {"max_epochs": 3}})
    logger.log_metrics({"x": 1.0})
    logger.save()
    logger.finalize("failed")
    assert path.read_bytes() == before and (tmp_path / "csv" / "hparams.yaml").exists()


def test_a_resume_keeps_the_rows_before_its_checkpoint_and_drops_the_partial_epoch(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    _write_history(path, HISTORY)
    logger = _logger(tmp_path)
    logger.resume_at(2, 8)  # the checkpoint of epoch 1: 8 steps done
    logger.log_metrics({"lr-AdamW": 0.03}, step=8)
    logger.log_metrics({"train/loss_step": 1.5, "epoch": 2}, step=8)
    logger.save()
    rows = list(csv.DictReader(open(path)))
    epochs_0_and_1 = [("", "0")] + [("0", str(s)) for s in (0, 1, 2, 3, 3)] + \
        [("", "4")] + [("1", str(s)) for s in (4, 5, 6, 7, 7)]
    assert [(r["epoch"], r["step"]) for r in rows] == epochs_0_and_1 + [("", "8"), ("2", "8")]
    assert rows[-2]["lr-AdamW"] == "0.03" and rows[-1]["train/loss_step"] == "1.5"
    logger.log_metrics({"test/bleu_4": 0.5})  # no step (as train.py logs the test scores): at the latest step
    logger.finalize("success")
    assert list(csv.DictReader(open(path)))[-1]["step"] == "8"


def test_a_fresh_run_sets_an_earlier_history_aside_and_links_are_never_followed(tmp_path):
    path, hparams = tmp_path / "csv" / "metrics.csv", tmp_path / "csv" / "hparams.yaml"
    _write_history(path, HISTORY)
    earlier = path.read_bytes()
    logger = _logger(tmp_path)
    logger.resume_at(0, 0)
    logger.log_metrics({"lr-AdamW": 0.1}, step=0)
    logger.save()
    aside = list(path.parent.glob("metrics.before-*.csv"))
    assert len(aside) == 1 and aside[0].read_bytes() == earlier
    assert [r["lr-AdamW"] for r in csv.DictReader(open(path))] == ["0.1"]

    victim = tmp_path / "victim.csv"
    victim.write_bytes(earlier)
    for link in (path, hparams):
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
    logger = _logger(tmp_path)
    logger.log_hyperparams({"seed": 0})
    logger.resume_at(2, 8)  # a link is not this run's history: not read, replaced
    logger.log_metrics({"lr-AdamW": 0.03}, step=8)
    logger.save()
    assert victim.read_bytes() == earlier and not path.is_symlink() and not hparams.is_symlink()
    assert [r["step"] for r in csv.DictReader(open(path))] == ["8"] and "seed: 0" in hparams.read_text()


def test_the_training_clock_adds_up_across_resumes(monkeypatch, caplog):
    import types

    from captioner import run_files
    from captioner.run_files import TrainingClock, training_seconds

    now = [100.0]
    monkeypatch.setattr(run_files.time, "perf_counter", lambda: now[0])
    clock = TrainingClock()
    clock.load_state_dict({"seconds": 10.0})  # what the resumed checkpoint had trained
    clock.on_train_start(None, None)
    now[0] = 103.0
    assert clock.state_dict() == {"seconds": 13.0}  # the checkpoint of this epoch: both processes' time
    now[0] = 105.0
    clock.on_train_end(None, None)
    now[0] = 200.0  # testing after training is not training
    assert training_seconds(types.SimpleNamespace(callbacks=[clock]), this_process=1.0) == 15.0
    assert training_seconds(types.SimpleNamespace(callbacks=[]), this_process=1.0) == 1.0
    for damaged in ({"seconds": "x"}, {"seconds": float("nan")}, {"seconds": -1}, {}, None):
        clock.load_state_dict(damaged)
        assert clock.seconds == 0.0


def test_the_comparison_report_is_never_written_through_a_link(fake_sweep, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "captioner.caption", None)  # no attention maps: not what is tested here
    out = fake_sweep / "report"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    names = ("report.md", "report.html", "report.json", "loss_curves.png", "bleu_curves.png")
    for name in names:
        (out / name).symlink_to(victim)
    build_report(fake_sweep, n_boot=10, html_images=1)
    assert victim.read_text() == "keep"
    assert all((out / name).is_file() and not (out / name).is_symlink() for name in names)
    assert "dino_attention" in (out / "report.md").read_text()
