"""The benchmark in CI size: `experiments/benchmark.py --smoke` produces every figure (no timing assertions)."""

import json
import math

from captioner.config import variants
from conftest import REPO, run_here

KEYS = ["extraction_vs_forward", "cached_speedup", "batched_beam_speedup", "rss_ratio_10x", "demo_sweep_seconds",
        "device", "captions_per_s"]


def test_benchmark_smoke_produces_every_figure(tmp_path):
    out = tmp_path / "benchmark.json"
    r = run_here(["experiments/benchmark.py", "--smoke", "--out", out, "--root", tmp_path / "root"])
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


def test_the_coco_scale_workload_runs_both_paths_and_counts_the_flops(tmp_path, monkeypatch):
    """experiments/training_speed.py at a tiny size on the CPU: every figure of the GPU workload is produced, the
    fast path really trains on resident features, and the FLOP counter sees the step (the attention decoder does
    more work per caption than the LSTM)."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import numpy as np
    import training_speed

    rows, tokens, lengths = training_speed.coco_like_captions(400, 5, 300, 30, seed=0)
    assert len(rows) == 2000 and np.array_equal(rows[:6], [0, 0, 0, 0, 0, 1])
    assert 11.5 < lengths.mean() < 13.5 and lengths.min() >= 7  # COCO's ~10.5 words + <sos>/<eos>
    ends = tokens[np.arange(len(tokens)), lengths - 1]
    position = np.arange(tokens.shape[1])[None, :]
    words = (position > 0) & (position < lengths[:, None] - 1)
    assert (tokens[:, 0] == 1).all() and (ends == 2).all() and (tokens[words] >= 4).all()
    assert (tokens[position >= lengths[:, None]] == 0).all()  # padding after <eos>
    out = training_speed.measure(["dino_lstm_init", "dino_attention"], 120, 32, False, 3, "cpu", workdir=tmp_path)
    for name, r in out["variants"].items():
        assert r["before"]["captions_per_s"] > 0 and r["after"]["captions_per_s"] > 0 and r["speedup"] > 0, name
        split = r["split"]
        assert split["forward_backward_s"] > 0 and split["optimizer_s"] > 0 and split["overhead_s"] >= 0
        assert split["captions_per_step"] > 16  # batches of about 32 captions (whole images; the last shorter)
    flops = {n: r["split"]["flops_per_caption"] for n, r in out["variants"].items()}
    assert 1e6 < flops["dino_lstm_init"] < flops["dino_attention"]
    assert out["peak_bf16_flops"] is None and out["variants"]["dino_attention"]["mfu"] is None  # no GPU peak here
