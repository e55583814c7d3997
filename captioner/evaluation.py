"""`evaluate(cfg)`: what `python eval.py ckpt_path=PATH` does — caption a split with a trained checkpoint and
score it with the full metric suite, writing `metrics.json` and `predictions.jsonl` into the run directory.

The checkpoint decides the vocabulary and the encoder (name, weights, transform): evaluating with anything else
would decode garbage, so an `encoder=...` on the command line that differs from the checkpoint's is refused. The
exception is `encoder.weights=FILE` for a checkpoint trained with a weights file that lives elsewhere here: it is
used when its SHA-256 is the one the checkpoint recorded.
Only the data (`data=...`, `split=val|test`) and the decoding (`decode.beam_size=3` ...) are chosen here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoint import check_features_match, load_captioner
from .encoders import EncoderSpec, relocate_weights
from .files import atomic_write_text
from .training import (ConfigError, build_datamodule, claim_run_directory, instantiate_trainer,
                       prepare_distributed_launch, run_directory, write_predictions)

log = logging.getLogger(__name__)


def _command_line_overrides() -> list[str]:
    if not hydra.core.hydra_config.HydraConfig.initialized():
        return []
    return list(hydra.core.hydra_config.HydraConfig.get().overrides.task)


# The spec fields that change the features (besides the weights, checked by content in `relocate_weights`).
FEATURE_FIELDS = ("name", "timm_name", "input_size", "resize", "crop_pct", "interpolation")
WEIGHTS_OPTION = "encoder.weights=/path/to/file"


def _encoder_override_keys(overrides: list[str]) -> set[str]:
    """The encoder fields a command line sets: `encoder.resize=pad` -> {"resize"}; `encoder=resnet50` chooses the
    whole node -> {"encoder"}."""
    keys = set()
    for o in overrides:
        path = o.split("=")[0].lstrip("+~").split(".")
        if path[0] == "encoder":
            keys.add(path[1] if len(path) > 1 else "encoder")
    return keys


def check_encoder_matches(requested: EncoderSpec, trained: EncoderSpec, overrides: list[str], ckpt: str) -> EncoderSpec:
    """The checkpoint's encoder spec to evaluate with, its weights file found (`relocate_weights`).

    An encoder setting on the command line that differs from the checkpoint's is refused: its decoder only
    understands the features it was trained on. The one accepted is `encoder.weights=FILE` where the checkpoint
    was trained with a weights file: the new location of that file, which must have the recorded SHA-256."""
    keys = _encoder_override_keys(overrides)
    whole = "encoder" in keys
    differ = [f for f in FEATURE_FIELDS if (whole or f in keys) and getattr(requested, f) != getattr(trained, f)]
    new_weights = None
    if whole or "weights" in keys:
        if trained.weights_file and requested.weights_file:
            new_weights = str(requested.weights)
        elif str(requested.weights) != str(trained.weights):
            differ.append("weights")
    if differ:
        def describe(spec: EncoderSpec) -> str:
            return ", ".join(f"{f}={getattr(spec, f)}" for f in differ)

        raise ConfigError(
            f"{ckpt} was trained on encoder {trained.name} ({describe(trained)}) but the command asks for encoder "
            f"{requested.name} ({describe(requested)}): its decoder only understands the features it was trained "
            "on. Drop the encoder override (the checkpoint's encoder is used automatically)")
    return relocate_weights(trained, new_weights, WEIGHTS_OPTION, ckpt)


def evaluate(cfg: DictConfig) -> dict:
    from . import schema

    if not cfg.get("ckpt_path"):
        raise ConfigError("eval.py needs ckpt_path=PATH (a .ckpt in a run's checkpoints/ folder)")
    schema.check_config(cfg, task="eval")
    run_dir = run_directory(cfg)
    with claim_run_directory(run_dir, "eval.py"):
        return evaluate_in(cfg, run_dir)


def evaluate_in(cfg: DictConfig, run_dir: Path) -> dict:
    """`evaluate` with the run dir held by this process."""
    import lightning as L

    from .config import option_name, resolve_device

    taken = [name for name in ("metrics.json", "predictions.jsonl") if (run_dir / name).exists()]
    if taken and not cfg.get("overwrite"):
        raise ConfigError(
            f"{run_dir} already holds {' and '.join(taken)} (a training run's, or an earlier evaluation's): eval.py "
            "writes its own there and would replace them. Give it a directory of its own (hydra.run.dir=...), or "
            "pass overwrite=true to replace them")
    model = load_captioner(cfg.ckpt_path)  # a checkpoint that must be refused is, before anything else is said
    L.seed_everything(cfg.seed, workers=True)
    trained = check_encoder_matches(EncoderSpec.from_config(cfg.encoder),
                                    EncoderSpec.from_checkpoint(model.hparams.encoder), _command_line_overrides(),
                                    cfg.ckpt_path)
    with open_dict(cfg):
        cfg.encoder = OmegaConf.create({**OmegaConf.to_container(cfg.encoder), **trained.to_dict()})
    dm = build_datamodule(cfg, vocab=model.vocab, feature=model.feature)
    dm.prepare_data()
    dm.setup("test")
    check_features_match(model, dm.feature_dim, dm.grid, f"the feature cache of encoder {trained.name}", cfg.ckpt_path)

    model.decode_cfg.update(OmegaConf.to_container(cfg.decode))
    model.hparams.meteor, model.hparams.tokenizer = cfg.metrics.meteor, cfg.metrics.tokenizer
    trainer = instantiate_trainer(cfg, logger=False, callbacks=[], max_epochs=1, default_root_dir=str(run_dir))
    prepare_distributed_launch(trainer, run_dir)
    t0 = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - t0
    metrics = {
        "checkpoint": str(Path(cfg.ckpt_path).expanduser().resolve()), "model": model.hparams.model_name,
        "encoder": trained.name, "decoder": option_name("decoder", model.hparams.decoder), "data": cfg.data.name,
        "split": dm.test_split, "images": len(model.test_predictions), "decode": dict(model.decode_cfg),
        "device": resolve_device(cfg.features.device), "eval_seconds": round(seconds, 2),
        "world_size": trainer.world_size, "test": model.test_results,
    }
    if not trainer.is_global_zero:  # DDP ranks 1..: the same (whole-split) results; rank 0 writes them
        return metrics
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_predictions(run_dir / "predictions.jsonl", dm, model.test_predictions)
    res = model.test_results
    print(f"[captioner] eval {metrics['model']} on {cfg.data.name}/{dm.test_split} (beam {model.decode_cfg['beam_size']}):"
          f" BLEU-4 {res['bleu_4']:.4f}, CIDEr {res['cider']:.3f} -> {run_dir}")
    return metrics
