"""Sweeps through Hydra plugins, as a user runs them: the submitit launcher (hydra/launcher=local, the local twin of
hydra/launcher=slurm) and the Optuna sweeper (hparams_search=optuna). Each test is skipped when its plugin is not
installed (pip install -e '.[cluster]' / '.[hparams]')."""

import json

import pytest
from omegaconf import OmegaConf

from conftest import run_cli

TINY = ["debug=tiny", "model=dino_lstm_init"]


def _run(args, root, timeout=600):
    # one torch thread per process: the jobs of a submitit sweep run at the same time
    return run_cli(args, root, timeout=timeout, env={"OMP_NUM_THREADS": 1})


def test_launcher_and_search_configs_compose():
    from captioner.config import compose

    cfg = compose(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert cfg.trainer.devices == 4  # the launcher sizes its jobs from these (checked below when installed)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from captioner.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)  # one task per GPU
    assert launcher._target_.endswith("SlurmLauncher")


def test_two_job_sweep_through_the_submitit_local_launcher(tiny_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    r = _run(["train.py", "-m", "hydra/launcher=local", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"], tiny_root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    found = {json.loads(p.read_text())["seed"]: p for p in sweep.glob("*/metrics.json")}
    assert set(found) == {0, 1}  # both jobs ran to the end, each in its own run dir
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # ... each in its own submitit process
    assert (sweep / "multirun.yaml").exists()


def test_optuna_search_runs_its_trials_and_reports_the_best(tiny_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    r = _run(["train.py", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY, f"hydra.sweep.dir={sweep}"],
             tiny_root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert len(runs) == 2
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert {"optimizer.lr", "optimizer.weight_decay", "decoder.dropout", "label_smoothing"} <= set(best.best_params)
    # the sweeper maximised what train.py returns: the best validation BLEU-4 of the runs
    assert best.best_value == pytest.approx(max(m["best_val_bleu_4"] for m in runs), abs=1e-6)
