"""Large batches vs the default batch at the same number of epochs, paired: `make batch-study STUDY=...`.

For each variant (default dino_lstm_init and dino_attention) and each seed of a `make study` sweep (the default
batch, loader.batch_size=64), train the same model, seed and epochs with a large batch and the learning rate
scaled by `lr_scaling.rule`, then compare the two image by image on the test set: mean ± sd over seeds of test
BLEU-4, CIDEr-D and the shapes world's semantic scores, and the difference large - default with a 95% interval
from the report's hierarchical bootstrap (test images resampled, paired; seeds resampled within each side). Also
the best validation BLEU-4 (what picks the checkpoint) and the training seconds of both.

usage: python experiments/batch_scaling.py STUDY_DIR [--variants dino_lstm_init dino_attention]
                                           [--batch-size 512] [--rule sqrt] [--out DIR] [--bootstrap 1000]

Runs land in DIR (default STUDY_DIR/batch-<size>-<rule>/); a run that already has its metrics.json is not run
again. Writes DIR/batch_scaling.md and DIR/batch_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "experiments"):  # the repo's package, and scst_study beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from captioner.modules import lr_scale  # noqa: E402
from captioner.report.runs import Run, find_runs  # noqa: E402
from scst_study import SCORES, compare, delta_table, fmt, hydra_string  # noqa: E402


def run_large(base: Run, out: Path, batch_size: int, rule: str) -> Path:
    """`train.py` with the base run's model and seed, a large batch and the scaled learning rate; its run dir."""
    model, seed = base.metrics["model"], base.seed
    run_dir = out / f"{model}_seed-{seed}_batch-{batch_size}"
    if (run_dir / "metrics.json").exists():
        return run_dir
    cmd = [sys.executable, str(REPO / "train.py"), f"model={model}", f"seed={seed}", f"loader.batch_size={batch_size}",
           f"lr_scaling.rule={rule}", "logger=csv", f"hydra.run.dir={hydra_string(run_dir)}"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"  {model} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def render(results: dict, batch_size: int, rule: str, labels: tuple[str, str]) -> str:
    small, large = labels
    lines = ["| variant | batch | best val BLEU-4 | " + " | ".join(f"test {s}" for s in SCORES) + " | train s |",
             "|---" * (len(SCORES) + 4) + "|"]
    for model, r in results.items():
        for label in labels:
            seconds = [s for s in r["train_seconds"][label] if s is not None]
            lines.append(f"| {model} | {label} | {fmt(r['val_bleu_4'][label])} | "
                         + " | ".join(fmt(r[label][s]) for s in SCORES)
                         + f" | {statistics.mean(seconds):.0f} |")
    lines += ["", *delta_table(results, "| variant | Δ test BLEU-4 [95% CI] | Δ test CIDEr-D [95% CI] | differs |")]
    lines += ["", f"Mean ± sd over seeds {', '.join(str(s) for s in next(iter(results.values()))['seeds'])}; the "
              f"same epochs on both sides. {large}: loader.batch_size={batch_size} with lr_scaling.rule={rule} (the "
              f"learning rate x{lr_scale(rule, batch_size, 64):.3g}) and the same warm-up fraction; {small}: the study's "
              "runs. Δ = large - default, hierarchical bootstrap over test images (paired) and seeds; `differs`: the "
              "interval excludes 0. Training seconds on this machine (the sweep's runs shared it with each other)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a `make study` sweep dir (multirun/study-<time>)")
    parser.add_argument("--variants", nargs="+", default=["dino_lstm_init", "dino_attention"])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--rule", choices=("sqrt", "linear", "none"), default="sqrt")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out or args.study / f"batch-{args.batch_size}-{args.rule}"
    out.mkdir(parents=True, exist_ok=True)
    runs, _ = find_runs(args.study, out)
    labels = ("64", str(args.batch_size))
    pairs = {}
    for model in args.variants:
        base_runs = sorted((r for r in runs if r.metrics.get("model") == model
                            and r.metrics.get("stage", "xe") == "xe"), key=lambda r: r.seed)
        if not base_runs:
            print(f"error: no finished {model} run in {args.study}", file=sys.stderr)
            return 2
        large_runs = []
        for base in base_runs:
            run_dir = run_large(base, out, args.batch_size, args.rule)
            large_runs.append(Run(dir=run_dir, metrics=json.loads((run_dir / "metrics.json").read_text()),
                                  seed=base.seed))
        pairs[model] = (base_runs, large_runs)
    results = compare(pairs, args.bootstrap, args.seed, stages=labels)
    for model, (base_runs, large_runs) in pairs.items():
        results[model]["val_bleu_4"] = {
            label: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))
            for label, v in ((labels[0], [r.metrics["best_val_bleu_4"] for r in base_runs]),
                             (labels[1], [r.metrics["best_val_bleu_4"] for r in large_runs]))}
    text = render(results, args.batch_size, args.rule, labels)
    (out / "batch_scaling.md").write_text(text)
    (out / "batch_scaling.json").write_text(json.dumps(
        {"batch_size": args.batch_size, "rule": args.rule, "results": results}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
