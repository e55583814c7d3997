"""`kill -9` during training, then the documented resume (`ckpt_path=last` in the same run dir): training goes on
from the last epoch's checkpoint instead of starting over, ends where an uninterrupted run ends, and leaves the same
CSV history (every epoch exactly once: the rows before the checkpoint kept, those of the killed epoch logged anew)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import REPO, run_here

TINY = ["debug=tiny", "trainer.max_epochs=4", "model=dino_lstm_init", "decoder.dropout=0.0",
        "trainer.log_every_n_steps=1"]  # step rows too: the killed epoch leaves some


def _env(root):
    return dict(os.environ, CAPTIONER_ROOT=str(root), WANDB_MODE="disabled")


def _train(root, run_dir, *extra):
    r = run_here(["train.py", *TINY, f"hydra.run.dir={run_dir}", *extra], root)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text()), r


def test_kill_9_mid_training_then_resume_reaches_the_uninterrupted_result(tiny_root, tmp_path):
    reference, _ = _train(tiny_root, tmp_path / "uninterrupted")

    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env=_env(tiny_root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the checkpoint write finish; the kill lands in the next epoch
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "metrics.json").exists()

    resumed, r = _train(tiny_root, run_dir, "ckpt_path=last")
    assert "Restoring states from the checkpoint" in r.stderr + r.stdout  # continued, not restarted
    assert resumed["epochs"] == reference["epochs"] == 4
    # the same seed, data order per epoch and restored optimizer/scheduler state: the same end point. The final
    # validation loss is the sharp check (10 test images make BLEU/CIDEr coarse; they only need to agree roughly)
    final = [_last_val_loss(d) for d in (tmp_path / "uninterrupted", run_dir)]
    assert final[1] == pytest.approx(final[0], rel=0.02), final
    assert abs(resumed["test"]["bleu_4"] - reference["test"]["bleu_4"]) <= 0.1
    # the history: every row the uninterrupted run logged, exactly once (none lost to the resume, none doubled)
    histories = [_history(d) for d in (tmp_path / "uninterrupted", run_dir)]
    assert histories[1] == histories[0] and max(histories[0].values()) == 1
    assert {epoch for epoch, _, _ in histories[1] if epoch is not None} == {0, 1, 2, 3, 4}  # 4: the test row


def _history(run_dir):
    """What metrics.csv holds, independent of values: (epoch, step, metric) of each logged cell (the
    learning-rate rows carry no epoch), counted."""
    counts = Counter()
    for row in csv.DictReader(open(run_dir / "csv" / "metrics.csv")):
        epoch = int(row["epoch"]) if row["epoch"] else None
        counts.update((epoch, int(row["step"]), key) for key, value in row.items()
                      if value and key not in ("epoch", "step"))
    return counts


def _last_val_loss(run_dir):
    rows = [r for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if r.get("val/loss")]
    return float(rows[-1]["val/loss"])


