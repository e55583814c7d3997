"""The benchmark in CI size: `experiments/benchmark.py --smoke` produces every figure (no timing assertions)."""

import json
import math
import os
import subprocess
import sys

from captioner.config import variants
from conftest import REPO

KEYS = ["extraction_vs_forward", "cached_speedup", "batched_beam_speedup", "rss_ratio_10x", "demo_sweep_seconds",
        "device", "captions_per_s"]


def test_benchmark_smoke_produces_every_figure(tmp_path):
    out = tmp_path / "benchmark.json"
    env = dict(os.environ, WANDB_MODE="disabled")
    r = subprocess.run([sys.executable, "experiments/benchmark.py", "--smoke", "--out", str(out),
                        "--root", str(tmp_path / "root")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    b = json.loads(out.read_text())
    assert set(KEYS) <= set(b)
    for key in ("extraction_vs_forward", "cached_speedup", "batched_beam_speedup", "rss_ratio_10x"):
        assert isinstance(b[key], float) and math.isfinite(b[key]) and b[key] > 0, key
        assert key.split("_")[0] in r.stdout or key in r.stdout or "goal" in r.stdout
    assert b["batched_fp32_beam_speedup"] > 0 and b["batched_bf16_beam_speedup"] > 0  # same-precision ratios
    assert b["beam_same_captions"] is True  # batched and one-at-a-time beam search agree
    assert b["beam_features"].startswith("the first 4 test images")  # decoded on real test-image features
    assert b["extraction_workers"] >= 0
    assert b["extraction_prepare_share"] > 0 and 0 < b["extraction_ceiling"] < 1  # what bounds figure 1
    assert "decode between forwards" in r.stdout
    assert b["cached_step_recurrent_s"] > 0 and b["cached_step_recurrent_share"] > 0  # what bounds figure 2
    assert math.isfinite(b["cached_speedup_ceiling"]) and "LSTM kernels alone" in r.stdout
    assert set(b["captions_per_s"]) == set(variants())
    assert all(v > 0 for v in b["captions_per_s"].values())
    assert "goal >= 0.9" in r.stdout and "goal <= 1.3" in r.stdout
