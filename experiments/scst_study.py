"""Cross-entropy vs + self-critical training, paired: `make scst-study STUDY=multirun/study-<time>`.

For each variant (default dino_lstm_init and dino_attention) and each of its seeds in a `make study` sweep, fine-tune
that run's best checkpoint with `stage=scst` for --epochs epochs (same seed, same data), then compare the two
stages image by image on the test set: mean ± sd over seeds of test BLEU-4, CIDEr-D and the shapes world's semantic
scores, and the difference SCST - cross-entropy with a 95% interval from the report's hierarchical bootstrap (test
images resampled, paired across the two stages; seeds resampled within each stage).

usage: python experiments/scst_study.py STUDY_DIR [--variants dino_lstm_init dino_attention] [--epochs 2]
                                        [--out DIR] [--bootstrap 1000] [--seed 0]

Runs land in DIR (default STUDY_DIR/scst/), one directory per variant and seed; a run that already has its
metrics.json is not run again. Writes DIR/scst_study.md and DIR/scst_study.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python experiments/scst_study.py` puts experiments/, not the repo root, on the path
    sys.path.insert(0, str(REPO))

from captioner.report.runs import Run, Variant, align_predictions, find_runs, read_run_files  # noqa: E402
from captioner.report.stats import hierarchical_deltas, holds_up, score_runs, seed_summary  # noqa: E402

SCORES = ("bleu_4", "cider", "object_accuracy", "relation_correct", "direction_accuracy")


def hydra_string(value: str) -> str:
    """A command-line override value Hydra reads as one string (a run dir's name holds commas)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_scst(xe: Run, out: Path, epochs: int) -> Path:
    """`train.py stage=scst` from an XE run's best checkpoint, same model and seed; its run dir."""
    model, seed = xe.metrics["model"], xe.seed
    run_dir = out / f"{model}_seed-{seed}_scst"
    if (run_dir / "metrics.json").exists():
        return run_dir
    cmd = [sys.executable, str(REPO / "train.py"), f"model={model}", f"seed={seed}", "stage=scst",
           f"init_from={hydra_string(xe.dir)}", f"trainer.max_epochs={epochs}", "logger=csv",
           f"hydra.run.dir={hydra_string(run_dir)}"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"  {model} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def compare(pairs: dict[str, tuple[list[Run], list[Run]]], n_boot: int, seed: int,
            stages: tuple[str, str] = ("xe", "scst")) -> dict:
    """{variant: {"xe": {score: (mean, sd, n)}, "scst": ..., "delta": {bleu_4|cider: CI}}}: the second of
    `stages` against the first, paired image by image, seed by seed."""
    out = {}
    a, b = stages
    for model, (a_runs, b_runs) in pairs.items():
        runs = a_runs + b_runs
        for run in runs:
            read_run_files(run)
        keys = align_predictions(runs)
        score_runs(runs, keys)
        first, second = Variant(f"{model} {a}", a_runs), Variant(f"{model} {b}", b_runs)
        deltas = hierarchical_deltas([first, second], first, len(keys), n_boot, seed)[second.label]
        out[model] = {
            stage: {name: seed_summary([r.test.get(name) for r in v.runs]) for name in SCORES}
            for stage, v in ((a, first), (b, second))}
        out[model]["delta"] = {m: {**ci, "holds_up": holds_up(ci)} for m, ci in deltas.items()}
        out[model]["seeds"] = [r.seed for r in a_runs]
        out[model]["epochs"] = {a: [r.metrics.get("epochs") for r in a_runs],
                                f"{a}_best_epoch": [r.metrics.get("best_epoch") for r in a_runs],
                                b: [r.metrics.get("epochs") for r in b_runs],
                                f"{b}_best_epoch": [r.metrics.get("best_epoch") for r in b_runs]}
        out[model]["train_seconds"] = {a: [r.metrics.get("train_seconds") for r in a_runs],
                                       b: [r.metrics.get("train_seconds") for r in b_runs]}
    return out


def fmt(summary) -> str:
    mean, sd, n = summary
    if mean is None:
        return "—"
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def delta_table(results: dict, header: str) -> list[str]:
    """Markdown rows of each variant's Δ BLEU-4 and Δ CIDEr-D with their intervals, and whether they hold up."""
    lines = [header, "|---|---|---|---|"]
    for model, r in results.items():
        d = r["delta"]
        lines.append(f"| {model} | {d['bleu_4']['delta']:+.3f} [{d['bleu_4']['lo']:+.3f}, {d['bleu_4']['hi']:+.3f}] | "
                     f"{d['cider']['delta']:+.3f} [{d['cider']['lo']:+.3f}, {d['cider']['hi']:+.3f}] | "
                     f"BLEU-4 {'yes' if d['bleu_4']['holds_up'] else 'no'}, "
                     f"CIDEr-D {'yes' if d['cider']['holds_up'] else 'no'} |")
    return lines


def render(results: dict, epochs: int) -> str:
    lines = ["| variant | stage | " + " | ".join(SCORES) + " |", "|---" * (len(SCORES) + 2) + "|"]
    for model, r in results.items():
        for stage in ("xe", "scst"):
            lines.append(f"| {model} | {stage} | " + " | ".join(fmt(r[stage][s]) for s in SCORES) + " |")
    lines += ["", *delta_table(results, "| variant | Δ BLEU-4 [95% CI] | Δ CIDEr-D [95% CI] | holds up |")]
    lines += ["", f"Mean ± sd over seeds {', '.join(str(s) for s in next(iter(results.values()))['seeds'])}; "
              f"SCST: {epochs} epoch(s) from each seed's best cross-entropy checkpoint. Δ = SCST - cross-entropy, "
              "hierarchical bootstrap over test images (paired) and seeds."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a `make study` sweep dir (multirun/study-<time>)")
    parser.add_argument("--variants", nargs="+", default=["dino_lstm_init", "dino_attention"])
    parser.add_argument("--epochs", type=int, default=2, help="SCST epochs per run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out or args.study / "scst"
    out.mkdir(parents=True, exist_ok=True)
    runs, _ = find_runs(args.study, out)
    pairs = {}
    for model in args.variants:
        xe_runs = sorted((r for r in runs if r.metrics.get("model") == model and r.metrics.get("stage", "xe") == "xe"),
                         key=lambda r: r.seed)
        if not xe_runs:
            print(f"error: no finished {model} run in {args.study}", file=sys.stderr)
            return 2
        scst_runs = []
        for xe in xe_runs:
            run_dir = run_scst(xe, out, args.epochs)
            scst_runs.append(Run(dir=run_dir, metrics=json.loads((run_dir / "metrics.json").read_text()),
                                 seed=xe.seed))
        pairs[model] = (xe_runs, scst_runs)
    results = compare(pairs, args.bootstrap, args.seed)
    text = render(results, args.epochs)
    (out / "scst_study.md").write_text(text)
    (out / "scst_study.json").write_text(json.dumps({"epochs": args.epochs, "results": results}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
