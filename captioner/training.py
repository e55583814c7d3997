"""`train(cfg)`: what `python train.py` does — seed, build data + model from the composed config, fit, test the
best checkpoint, write `metrics.json` into the run directory, and return the metric a sweeper optimises.

Under DDP (`trainer=ddp`, `trainer=ddp_cpu`) Lightning starts ranks 1.. by re-running the same command with
`hydra.run.dir` set to rank 0's run dir, so every rank runs this function; all of them fit and test (the metrics
are those of the whole split on every rank), and only global rank 0 writes metrics.json / predictions.jsonl."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from . import wandb_logging
from .checkpoint import CheckpointError, check_state_matches, checked_hyper_parameters, read_checkpoint
from .config import resolve_precision
from .data import is_shapes
from .data.datamodule import CaptionDataModule
from .data.vocabulary import Vocabulary
from .errors import ConfigError
from .files import atomic_write_text
from .memory import keep_freed_memory
from .scoring.metrics import caption_prior_baseline

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Refuse a configuration that cannot work, before anything is built: each value against the schema
    (captioner.schema), then the combinations."""
    from . import schema

    schema.check_config(cfg, task=cfg.get("task", "train"))
    check_encoder_not_swapped(cfg)
    check_parts_fit(cfg)
    if OmegaConf.select(cfg, "logger.wandb", default=None) is not None:
        wandb_logging.run_mode(OmegaConf.select(cfg, "logger.wandb.mode", default=None))  # a WANDB_MODE typo


def check_parts_fit(cfg: DictConfig) -> None:
    """The decoder must read the features the model family feeds it (attention=none: a pooled vector; an attention
    mechanism: spatial tokens), and an attention mechanism needs a decoder that attends with it."""
    from hydra.utils import get_class

    decoder, attention = choice(cfg, "decoder"), choice(cfg, "attention")
    family = get_class(cfg.model._target_)
    reads = get_class(cfg.decoder._target_).feature
    if cfg.attention is not None and "attention" not in cfg.decoder:
        raise ConfigError(
            f"attention={attention} attends over spatial tokens, but decoder={decoder} reads a pooled vector and has "
            "no attention; use attention=none, or model=dino_attention / decoder=transformer")
    if reads != family.feature:
        raise ConfigError(
            f"decoder={decoder} reads {reads} features, but attention={attention} makes the model a "
            f"{family.__name__}, which feeds it {family.feature} ones; use decoder=transformer with attention=mha, "
            "and rnn/lstm/lstm_init with attention=none")


def choice(cfg: DictConfig, group: str) -> str:
    """The option of a config group this run composed (as Hydra recorded it, else found by its `_target_`)."""
    from hydra.core.hydra_config import HydraConfig

    from .config import option_name

    if HydraConfig.initialized() and HydraConfig.get().runtime.choices.get(group):
        return str(HydraConfig.get().runtime.choices[group])
    return option_name(group, cfg.get(group))


def check_encoder_not_swapped(cfg: DictConfig) -> None:
    """The default experiment=shapes_offline puts the packaged EfficientNet-Lite0 in place of each model's own
    encoder, which suits the offline shapes demo only: on real data it would silently train another model than the
    one named, so it is refused with the ways out."""
    if cfg.get("offline_encoder_swap") != cfg.encoder.name or is_shapes(cfg.data):
        return  # no swap, an encoder named on the command line, or the data the swap is for
    raise ConfigError(
        f"data={cfg.data.name} with the default experiment=shapes_offline would train model={cfg.model.name} on the "
        f"packaged EfficientNet-Lite0 ({cfg.encoder.name}) instead of its own encoder: that swap is for the offline "
        "shapes demo only. Add experiment=flickr8k, flickr30k or coco (the recipes of the published scores: split, "
        "vocabulary, lengths, beam), or experiment=none (the model's own encoder, your settings), or "
        "experiment=none encoder=efficientnet_lite0 to use Lite0 on purpose")


def build_datamodule(cfg: DictConfig, vocab=None, feature: str | None = None) -> CaptionDataModule:
    """The DataModule of a composed config (`cfg.datamodule`), reading the features the model family feeds its
    decoder (`feature`: those of a checkpoint's model instead); `vocab`: a checkpoint's, instead of building one
    from train."""
    node = OmegaConf.to_container(cfg.datamodule, resolve=True)
    # self-critical training samples captions per image and rewards them against all its references
    batches = "images" if cfg.get("scst") else "captions"
    return hydra.utils.instantiate(node, feature=feature or model_family(cfg).feature, vocab=vocab,
                                   train_batches=batches, _convert_="all")


def model_family(cfg: DictConfig) -> type:
    """The LightningModule class the config builds (`model._target_`, set by the attention/ option)."""
    return hydra.utils.get_class(cfg.model._target_)


def build_model(cfg: DictConfig, dm: CaptionDataModule):
    """The LightningModule of `model._target_` (its family) around the decoder of `decoder` (a `_partial_` node,
    kept as plain data in the checkpoint), completed with what the data decided."""
    module = OmegaConf.to_container(cfg.model, resolve=True)
    name = module.pop("name")
    module.pop("variant", None)  # the variant's number, for listing
    scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") is not None else None
    return hydra.utils.instantiate(
        module, vocab=dm.vocab.to_dict(), decoder=OmegaConf.to_container(cfg.decoder, resolve=True),
        encoder=dm.encoder_spec.to_dict(), model_name=name, feature_dim=dm.feature_dim, grid=tuple(dm.grid),
        optimizer=hydra.utils.instantiate(cfg.optimizer), scheduler=scheduler, label_smoothing=cfg.label_smoothing,
        decode=OmegaConf.to_container(cfg.decode), meteor=cfg.metrics.meteor, tokenizer=cfg.metrics.tokenizer,
        scst=OmegaConf.to_container(cfg.scst) if cfg.get("scst") else None,
        lr_scaling=OmegaConf.to_container(cfg.lr_scaling) if cfg.get("lr_scaling") else None,
        compile=bool(cfg.get("compile", False)),
        _recursive_=False, _convert_="all")  # the decoder's node stays data: the module builds it


def instantiate_trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    """`cfg.trainer` instantiated, with `precision: auto` resolved for this machine (see `resolve_precision`) and
    the atomic checkpoint writer."""
    from .run_files import checkpoint_plugins

    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    # every checkpoint written whole or not at all, never through a planted link (captioner/run_files.py)
    return hydra.utils.instantiate(cfg.trainer, precision=precision, plugins=checkpoint_plugins(), **kwargs,
                                   **DATA_SHARDING)


# The DataModule shards its loaders itself under DDP (GroupedBatches cannot take a sampler injected by
# Lightning, and its own padding of val/test is undone by the model): never let Lightning replace the samplers.
DATA_SHARDING = {"use_distributed_sampler": False}


def prepare_distributed_launch(trainer: L.Trainer, run_dir: Path) -> None:
    """Before `fit`/`test` of a trainer that will start its other ranks by re-running this command (Lightning's
    script launcher: `trainer=ddp` / `ddp_cpu` on one machine): pin Hydra's run dir to this run's absolute output
    dir, which Lightning hands to the children, so every rank works in one run dir (never one per rank); and refuse
    a Hydra multirun, whose children would re-run the whole sweep. Ranks started by SLURM (hydra/launcher=slurm,
    srun) are not spawned by Lightning and need neither."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
    from omegaconf import read_write

    launcher = getattr(trainer.strategy, "launcher", None)
    spawns = isinstance(launcher, _SubprocessScriptLauncher) and trainer.num_devices > 1 and \
        not trainer.strategy.cluster_environment.creates_processes_externally
    if not spawns or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"a multirun (-m) cannot run jobs with trainer.devices={trainer.num_devices} on one machine: Lightning "
            "starts the other ranks by re-running the command, which would re-run the whole sweep. Run the jobs one "
            "by one (python train.py trainer=ddp ... per job), or sweep on SLURM with hydra/launcher=slurm, where "
            "SLURM starts the ranks")
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = str(run_dir.resolve())


def run_directory(cfg: DictConfig) -> Path:
    """This run's output dir (Hydra's, or trainer.default_root_dir outside Hydra), created."""
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir) if \
        hydra.core.hydra_config.HydraConfig.initialized() else Path(cfg.trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _instantiate_all(node) -> list:
    """The parts of a group of `_target_` nodes (loggers, callbacks); a factory may build nothing (None: W&B with
    WANDB_MODE=disabled)."""
    built = [hydra.utils.instantiate(v) for v in (node or {}).values() if v is not None and "_target_" in v]
    return [part for part in built if part is not None]


def train(cfg: DictConfig) -> float:
    check_config(cfg)
    run_dir = run_directory(cfg)
    with claim_run_directory(run_dir, "train.py"):
        return fit_and_test(cfg, run_dir)


def claim_run_directory(run_dir: Path, command: str):
    """This process's exclusive use of its run dir (`captioner.files.exclusive_use`); DDP ranks 1.. share rank 0's
    run dir by design and claim nothing."""
    import contextlib

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from .files import exclusive_use

    return exclusive_use(run_dir, command) if rank_zero_only.rank == 0 else contextlib.nullcontext()


def fit_and_test(cfg: DictConfig, run_dir: Path) -> float:
    """Fit, test the best checkpoint, write the run's results; the value a sweeper optimises."""
    keep_freed_memory()  # no page faults for the same activations every step (captioner/memory.py)
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), run_dir)
    L.seed_everything(cfg.seed, workers=True)
    if "offline" in str(cfg.run_name):
        log.info("experiment=shapes_offline: %s runs with the packaged EfficientNet-Lite0 in place of its own "
                 "encoder (%s features)", cfg.model.name, model_family(cfg).feature)

    resumed = read_checkpoint(ckpt_path) if ckpt_path else None
    init_path = initial_weights(cfg.get("init_from"))
    initial = read_checkpoint(init_path) if init_path else None
    # A resumed (or fine-tuned) model keeps its own vocabulary: one rebuilt from captions edited since would
    # renumber its words.
    source, source_path = (resumed, ckpt_path) if resumed else (initial, init_path)
    vocab = checked_hyper_parameters(source["hyper_parameters"], source_path)["vocab"] if source else None
    dm = build_datamodule(cfg, vocab=Vocabulary.from_dict(vocab) if vocab else None)
    dm.prepare_data()
    dm.setup("fit")
    # again: building a missing cache runs the encoder's random init, so without this the model's weights and
    # the batch order would depend on whether the cache existed
    L.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg, dm)
    if initial:  # stage=scst: start from the cross-entropy checkpoint's weights (its optimiser state is not reused)
        check_state_matches(model, initial, init_path, action="fine-tune")
        model.load_state_dict(initial["state_dict"])
    if resumed:
        check_state_matches(model, resumed, ckpt_path)  # another model's checkpoint: refused, not half-loaded
        check_training_state(resumed, ckpt_path)
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write (Lightning refuses to start)
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer = instantiate_trainer(cfg, logger=loggers or False, callbacks=callbacks)
    log.info("precision %s, %d torch threads", trainer.precision, torch.get_num_threads())
    prepare_distributed_launch(trainer, run_dir)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    from .run_files import training_seconds
    train_seconds = training_seconds(trainer, this_process=time.perf_counter() - t0)  # all resumes included

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)
    test = model.test_results

    best_score = checkpoint.best_model_score if checkpoint is not None else None
    monitor = checkpoint.monitor if checkpoint is not None else None
    value = float(best_score) if best_score is not None else None
    sweep_value = value if value is not None and math.isfinite(value) else 0.0
    if not trainer.is_global_zero:  # DDP ranks 1..: rank 0 writes the results of the whole split
        wandb_logging.finish(loggers)
        return sweep_value
    baseline = caption_prior_baseline(dm, model.test_predictions, tokenizer=cfg.metrics.tokenizer)
    metrics = {
        "model": cfg.model.name, "run_name": cfg.run_name, "family": model.family,
        "encoder": dm.encoder_spec.name, "encoder_weights": str(dm.encoder_spec.weights),
        "decoder": choice(cfg, "decoder"), "attention": choice(cfg, "attention"),
        "stage": "scst" if cfg.get("scst") else "xe", "init_from": init_path,
        "data": cfg.data.name,
        "test": test,
        "caption_prior_bleu_4": baseline,
        "selected_by": monitor,
        "best_val_bleu_4": value if monitor == "val/bleu_4" else None,
        "best_val_cider": value if monitor == "val/cider" else None,
        "best_epoch": _epoch_of(best), "epochs": trainer.current_epoch,
        "train_seconds": round(train_seconds, 2), "world_size": trainer.world_size,
        "params_trainable": model.num_trainable_parameters(),
        "best_checkpoint": best, "run_dir": str(run_dir), "seed": cfg.seed,
        "data_stats": {k: v for k, v in dm.stats.items()},
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_predictions(run_dir / "predictions.jsonl", dm, model.test_predictions)
    model.write_test_outputs(run_dir, dm.records[dm.test_split], loggers)
    for lg in loggers:
        lg.log_metrics({f"test/{k}": v for k, v in test.items() if isinstance(v, (int, float))})
    wandb_logging.log_test_samples(loggers, dm.records[dm.test_split], model.test_predictions)
    wandb_logging.write_summary(loggers, metrics)
    wandb_logging.finish(loggers)
    log.info("done: %s | test BLEU-4 %.3f | CIDEr %.3f | run dir %s", cfg.run_name, test["bleu_4"], test["cider"],
             run_dir)
    print(f"[captioner] {cfg.run_name}: test BLEU-4 {test['bleu_4']:.4f} (caption prior {baseline:.4f}), "
          f"CIDEr {test['cider']:.3f} -> {run_dir}")
    return sweep_value


def initial_weights(init_from: str | None) -> str | None:
    """The checkpoint `init_from` names (stage=scst starts from a cross-entropy run's weights): a .ckpt file, or a
    run directory, whose checkpoints/best-*.ckpt is taken."""
    if not init_from:
        return None
    path = Path(str(init_from)).expanduser()
    if path.is_dir():
        best = sorted((path / "checkpoints").glob("best-*.ckpt")) if (path / "checkpoints").is_dir() else []
        if len(best) != 1:
            raise ConfigError(
                f"init_from={init_from}: a run directory must hold exactly one checkpoints/best-*.ckpt, found "
                f"{len(best)}; pass the checkpoint file itself")
        path = best[0]
    return str(path)  # read (and checked to hold plain data) once, by fit_and_test


def resume_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    """The local checkpoint file to resume from (`last`: this run dir's last.ckpt, when there is one), checked to
    hold plain data before Lightning loads it: a checkpoint can carry a pickled payload that runs code when
    unpickled, and Lightning unpickles remote (URL, fsspec) checkpoints in full, so those are refused."""
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise ConfigError(
                f"ckpt_path=last: there is no {last} to resume from (ckpt_path=last resumes the run in "
                "hydra.run.dir=<its directory>). Pass that run's directory, a checkpoint's path, or drop ckpt_path "
                "to start a new run")
        ckpt_path = str(last)
    if ckpt_path is not None:
        read_checkpoint(ckpt_path)  # raises CheckpointError for a URL, a missing file or a pickled payload
    return ckpt_path


# What Lightning restores to continue training, beyond the weights.
TRAINING_STATE = ("epoch", "global_step", "loops", "optimizer_states", "lr_schedulers")


def check_training_state(ckpt: dict, path: str) -> None:
    """Refuse to resume from a checkpoint without the training state Lightning restores (an edited or exported
    one): its weights can still be evaluated."""
    lacking = [k for k in TRAINING_STATE if k not in ckpt]
    if "optimizer_states" in ckpt and not (isinstance(ckpt["optimizer_states"], list) and ckpt["optimizer_states"]):
        lacking.append("optimizer_states (empty)")
    if lacking:
        raise CheckpointError(
            f"{path}: cannot resume from it: it holds no training state ({', '.join(lacking)} missing), only what "
            "evaluation needs. Evaluate it with eval.py ckpt_path=..., or resume from the run's own "
            "checkpoints/last.ckpt")


def _epoch_of(path: str | None) -> int | None:
    if not path:
        return None
    import re

    m = re.search(r"epoch(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def write_predictions(path: Path, dm: CaptionDataModule, predictions: list[dict]) -> None:
    """predictions.jsonl: one line per evaluated image (image key and path, hypothesis, references)."""
    records = dm.records[dm.test_split]
    lines = (json.dumps({"image": records[p["index"]].key, "image_path": str(records[p["index"]].image),
                         "hypothesis": p["hypothesis"], "references": p["references"]}) + "\n" for p in predictions)
    atomic_write_text(path, "".join(lines))
