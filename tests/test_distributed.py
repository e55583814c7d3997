"""Scale-out: DDP (2 CPU processes, gloo) trains and evaluates exactly like one process (sweeps through the
submitit launcher and Optuna: test_launchers.py).

The end-to-end tests run `train.py` / `eval.py` as a user does, on a tiny shapes world whose test split (11 images)
does not divide by 2: a DistributedSampler then gives one rank a repeated image, which must not be scored twice.
"""

import json

import numpy as np
import pytest

from conftest import REPO, run_cli, run_here

TINY = ["debug=tiny", "model=dino_lstm_init", "data.num_test=11"]  # 11: test shards of unequal size


def _run(args, root, timeout=600, threads=None, processes=2):
    """A command of the test as a user runs it: in processes of its own where it runs two (DDP, torchrun), else
    in this one (run_here: the same result without a new interpreter's imports)."""
    run = run_cli if processes == 2 else run_here
    return run(args, root, timeout=timeout, env={"OMP_NUM_THREADS": threads} if threads is not None else None)


# -- fast checks of the pieces ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("by_length", [False, True])
def test_grouped_training_batches_are_sharded_evenly_and_completely(by_length):
    from captioner.data.datamodule import GroupedBatches

    # 27 images x 5 captions in batches of >= 16 captions (4 whole images): 6 batches of 20 and one of 15
    pair_rows = np.repeat(np.arange(27), 5)
    lengths = np.random.default_rng(0).integers(5, 25, pair_rows.size) if by_length else None
    single = list(GroupedBatches(pair_rows, 16, seed=1, lengths=lengths))
    assert len(single) == 7
    for world in (2, 3):  # 7 batches do not divide: 1 and 2 batches of padding
        shards = [list(GroupedBatches(pair_rows, 16, seed=1, num_replicas=world, rank=r, lengths=lengths))
                  for r in range(world)]
        assert {len(s) for s in shards} == {-(-7 // world)}  # every rank runs the same number of steps
        seen = sorted(i for s in shards for b in s for i in b)
        assert set(seen) == set(range(len(pair_rows)))  # every caption is trained on
        assert 0 < len(seen) - len(pair_rows) <= (world - 1) * 20  # padding: fewer than `world` repeated batches
        for s in shards:
            assert all(len(set(pair_rows[b])) * 5 == len(b) for b in s)  # still whole images
    # one process: exactly the batches it had before sharding existed
    assert list(GroupedBatches(pair_rows, 16, seed=1, num_replicas=1, rank=0, lengths=lengths)) == single


def test_gathered_outputs_drop_the_padded_repeats_and_sort(monkeypatch):
    """What a rank sees after `all_gather_object`: rank 1's shard ends with a repeat of image 0 (DistributedSampler
    padding 11 images to 2 x 6); the gathered list scores each image once, in index order."""
    import torch

    from captioner.modules import Captioner

    shards = {0: [0, 2, 4, 6, 8, 10], 1: [1, 3, 5, 7, 9, 0]}

    def outputs(idx):
        return [{"index": i, "hypothesis": f"caption {i}", "references": [f"ref {i}"]} for i in idx]

    def all_gather_object(out, obj):
        out[:] = [outputs(shards[0]), outputs(shards[1])]

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    model = Captioner.__new__(Captioner)
    object.__setattr__(model, "eval_outputs", outputs(shards[1]))
    gathered = Captioner.gather_eval_outputs(model)
    assert [o["index"] for o in gathered] == list(range(11))
    assert all(o["hypothesis"] == f"caption {o['index']}" for o in gathered)


def test_validation_bleu_is_the_reported_test_bleu():
    """Checkpoints are selected on the metric that is reported: validation BLEU-1..4 equal caption_metrics' BLEU
    (the test metric) on the same captions, tokenisation included."""
    from captioner.scoring.metrics import caption_metrics, validation_scores

    hyps = ["A red circle, left of a blue square.", "a green star", "a small blue triangle above a large circle",
            "there is a yellow square"]
    refs = [["A red circle to the left of a blue square.", "a blue square right of a red circle"],
            ["a green star (above an orange triangle)"], ["a small blue triangle above a large green circle"],
            ["a yellow square", "There's a yellow square left of a star!"]]
    whole = validation_scores(hyps, refs)
    reported = caption_metrics(hyps, refs, meteor=False)
    for n in range(1, 5):
        assert whole[f"bleu_{n}"] == pytest.approx(reported[f"bleu_{n}"], abs=1e-12), n
    assert 0 < whole["bleu_4"] < whole["bleu_1"] <= 1


def test_ddp_configs_compose():
    from captioner.config import compose

    cfg = compose(["trainer=ddp_cpu", "trainer.devices=3"])
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 3 and cfg.trainer.num_nodes == 1
    assert cfg.trainer.strategy.process_group_backend == "gloo"
    cfg = compose(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes) == ("gpu", 4, 2)


# -- end to end: 2-process DDP training and evaluation -------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A tiny dino_lstm_init run trained with 2 DDP processes on CPU: (root, run dir, the finished process, and
    every metrics.json under root right after it: later tests add eval run dirs)."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "run"
    r = _run(["train.py", "trainer=ddp_cpu", *TINY, f"hydra.run.dir={run_dir}"], root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    r.metrics_files = sorted(root.rglob("metrics.json"))
    r.top_level = sorted(p.name for p in root.iterdir())
    print(f"DDP training (2 processes): {r.seconds:.1f} s wall")
    return root, run_dir, r


@pytest.mark.e2e
def test_ddp_training_writes_one_run_dir_with_one_metrics_json(ddp_run):
    root, run_dir, r = ddp_run
    # rank 1 really ran (its own Hydra log), in rank 0's run dir: no second run dir, no .hydra of its own
    assert (run_dir / "train_ddp_process_1.log").exists() and (run_dir / "train.log").exists()
    assert r.top_level == ["data", "run"]
    assert not (REPO / "outputs" / "train_ddp_process_1").exists()
    assert r.metrics_files == [run_dir / "metrics.json"]
    assert (run_dir / ".hydra" / "config.yaml").exists()  # written once, by rank 0 (children: output_subdir=null)
    assert r.stdout.count("[captioner] ") == 1  # one summary line: rank 0's
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["model"] == "dino_lstm_init" and m["epochs"] == 1
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider", "object_accuracy"):
        assert 0 <= m["test"][key] <= (10 if key == "cider" else 1), key
    assert 0 <= m["best_val_bleu_4"] <= 1 and m["best_epoch"] == 0
    lines = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 11 and len({x["image"] for x in lines}) == 11  # every test image once, none twice
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "csv" / "metrics.csv").exists()


@pytest.mark.e2e
def test_eval_with_one_and_two_processes_gives_identical_metrics(ddp_run):
    root, run_dir, train = ddp_run
    ckpt = json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    results = {}
    for name, extra, processes in (("one", [], 1), ("two", ["trainer=ddp_cpu"], 2)):
        out = root / f"eval-{name}"
        # one torch thread per process in both runs: the comparison is about the sharding, not thread counts
        r = _run(["eval.py", f"ckpt_path={ckpt}", *TINY, *extra, f"hydra.run.dir={out}"], root, threads=1,
                 processes=processes)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        m = json.loads((out / "metrics.json").read_text())
        preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        results[name] = (m, preds)
        print(f"eval {name} process(es): {r.seconds:.1f} s wall, BLEU-4 {m['test']['bleu_4']:.6f}, "
              f"CIDEr {m['test']['cider']:.6f}, images {m['images']}")
    (one, one_preds), (two, two_preds) = results["one"], results["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["images"] == two["images"] == 11 and len(one_preds) == len(two_preds) == 11
    assert one_preds == two_preds  # the same caption for every image, in the same order
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider", "object_accuracy", "relation_accuracy"):
        assert two["test"][key] == pytest.approx(one["test"][key], abs=1e-6), key
    assert one["test"]["cider"] > 0  # a real comparison, not 0 == 0
    # and the test at the end of the DDP training scored the same checkpoint the same way
    trained = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert trained["bleu_4"] == pytest.approx(one["test"]["bleu_4"], abs=1e-6)
    assert trained["cider"] == pytest.approx(one["test"]["cider"], abs=1e-6)


@pytest.mark.e2e
def test_ddp_validation_bleu_is_that_of_the_whole_split(ddp_run):
    """The val BLEU-4 the DDP run logged (each rank decoded 5 of the 10 val images) equals the BLEU-4 of one process
    decoding all 10 with the same weights."""
    from captioner.scoring.metrics import validation_scores

    root, run_dir, _ = ddp_run
    m = json.loads((run_dir / "metrics.json").read_text())
    out = root / "eval-val"
    r = _run(["eval.py", f"ckpt_path={m['best_checkpoint']}", *TINY, "split=val", f"hydra.run.dir={out}"], root,
             processes=1)
    assert r.returncode == 0, r.stderr[-4000:]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 10
    whole = validation_scores([p["hypothesis"] for p in preds], [p["references"] for p in preds])
    assert m["best_val_bleu_4"] == pytest.approx(whole["bleu_4"], abs=1e-6)


@pytest.mark.e2e
def test_a_local_multirun_refuses_ddp_jobs_with_the_fix(ddp_run, tmp_path):
    root = ddp_run[0]  # its data and feature cache: the job gets to the check at once
    r = _run(["train.py", "-m", "trainer=ddp_cpu", "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
             root, timeout=300, processes=1)  # the sweep's process refuses before any job starts its ranks
    assert r.returncode != 0
    assert "multirun" in r.stderr and "hydra/launcher=slurm" in r.stderr


# -- feature extraction shared by the ranks -----------------------------------------------------------------------
def _cache_digests(root) -> dict[str, str]:
    """{split/array: sha256} of every feature cache under root (one dataset per root; its id names the root)."""
    import hashlib

    out = {}
    for manifest in (root / "data" / "cache").glob("*/manifest.json"):
        label = json.loads(manifest.read_text())["label"].rsplit("/", 1)[-1]
        for array in sorted(manifest.parent.glob("*.npy")):
            out[f"{label}/{array.name}"] = hashlib.sha256(array.read_bytes()).hexdigest()
    return out


@pytest.mark.e2e
def test_ranks_share_the_feature_extraction_and_the_cache_is_byte_identical(tmp_path):
    """`torchrun --nproc-per-node 2 -m captioner.prepare`: both processes encode (every other chunk) into one cache,
    byte-identical to a one-process extraction (one torch thread in both: the thread count may change the bits)."""
    digests = {}
    for name, launcher, processes in (("one", [], 1),
                                      ("torchrun", ["-m", "torch.distributed.run", "--nproc-per-node", "2"], 2)):
        r = _run([*launcher, "-m", "captioner.prepare", *TINY], tmp_path / name, timeout=300, threads=1,
                 processes=processes)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        digests[name] = _cache_digests(tmp_path / name)
        print(f"prepare with {name}: {r.seconds:.1f} s wall")
        if name == "torchrun":  # each process really took its share
            assert "rank 0 of 2 extracts" in r.stderr and "rank 1 of 2 extracts" in r.stderr, r.stderr[-3000:]
    assert len(digests["one"]) == 3  # train/val/test pooled features
    assert digests["torchrun"] == digests["one"]


@pytest.mark.e2e
def test_ddp_self_critical_training_gives_each_rank_its_own_images(ddp_run, tmp_path):
    """stage=scst under DDP: each rank samples and rewards its own half of the training images (40 images, 16
    per batch: 2 steps an epoch per rank instead of 3 in one process), and the run finishes like one process."""
    import torch

    root, xe_dir, _ = ddp_run
    run_dir = tmp_path / "scst"
    r = _run(["train.py", "trainer=ddp_cpu", *TINY, "stage=scst", f"init_from={xe_dir}",
              f"hydra.run.dir={run_dir}"], root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["stage"] == "scst" and m["selected_by"] == "val/cider"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 11  # the whole test split, every image once
