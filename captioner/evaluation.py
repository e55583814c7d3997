"""`evaluate(cfg)`: what `python eval.py ckpt_path=PATH` does — caption a split with a trained checkpoint and
score it with the full metric suite, writing `metrics.json` and `predictions.jsonl` into the run directory.

The checkpoint decides the vocabulary and the encoder (name, weights, transform): evaluating with anything else
would decode garbage, so an `encoder=...` on the command line that differs from the checkpoint's is refused.
Only the data (`data=...`, `split=val|test`) and the decoding (`decode.beam_size=3` ...) are chosen here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoint import load_captioner
from .encoders import EncoderSpec
from .training import (ConfigError, build_datamodule, instantiate_trainer, prepare_distributed_launch, run_directory,
                       write_predictions)

log = logging.getLogger(__name__)


def _command_line_overrides() -> list[str]:
    if not hydra.core.hydra_config.HydraConfig.initialized():
        return []
    return list(hydra.core.hydra_config.HydraConfig.get().overrides.task)


def check_encoder_matches(requested: EncoderSpec, trained: EncoderSpec, overrides: list[str], ckpt: str) -> None:
    """Refuse an encoder asked for on the command line that is not the one the checkpoint was trained on."""
    asked = any(o.split("=")[0].lstrip("+~").split(".")[0] == "encoder" for o in overrides)
    if not asked:
        return
    same = (requested.timm_name, str(requested.weights), requested.input_size) == \
        (trained.timm_name, str(trained.weights), trained.input_size)
    if not same:
        raise ConfigError(
            f"{ckpt} was trained on encoder {trained.name} ({trained.timm_name}, weights {trained.weights}, "
            f"{trained.input_size}px) but the command asks for encoder {requested.name} ({requested.timm_name}, "
            f"weights {requested.weights}, {requested.input_size}px): its decoder only understands the features "
            "it was trained on. Drop the encoder override (the checkpoint's encoder is used automatically)")


def evaluate(cfg: DictConfig) -> dict:
    import lightning as L

    from .config import resolve_device

    if not cfg.get("ckpt_path"):
        raise ConfigError("eval.py needs ckpt_path=PATH (a .ckpt in a run's checkpoints/ folder)")
    run_dir = run_directory(cfg)
    L.seed_everything(cfg.seed, workers=True)

    model = load_captioner(cfg.ckpt_path)
    trained = EncoderSpec(**model.hparams.encoder)
    check_encoder_matches(EncoderSpec.from_config(cfg.encoder), trained, _command_line_overrides(), cfg.ckpt_path)
    with open_dict(cfg):
        cfg.encoder = OmegaConf.create({**OmegaConf.to_container(cfg.encoder), **trained.to_dict()})
        cfg.decoder.feature = model.decoder.feature
    dm = build_datamodule(cfg, vocab=model.vocab)
    dm.prepare_data()
    dm.setup("test")
    if dm.feature_dim != model.hparams.feature_dim:
        raise ConfigError(f"{cfg.ckpt_path}: the decoder expects {model.hparams.feature_dim}-d features, the cache "
                          f"of encoder {trained.name} has {dm.feature_dim}-d")

    model.decode_cfg.update(OmegaConf.to_container(cfg.decode))
    model.hparams.meteor = cfg.metrics.meteor
    trainer = instantiate_trainer(cfg, logger=False, callbacks=[], max_epochs=1, default_root_dir=str(run_dir))
    prepare_distributed_launch(trainer, run_dir)
    t0 = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - t0
    metrics = {
        "checkpoint": str(Path(cfg.ckpt_path).expanduser().resolve()), "model": model.hparams.model_name,
        "encoder": trained.name, "decoder": model.hparams.decoder["name"], "data": cfg.data.name,
        "split": dm.test_split, "images": len(model.test_predictions), "decode": dict(model.decode_cfg),
        "device": resolve_device(cfg.features.device), "eval_seconds": round(seconds, 2),
        "world_size": trainer.world_size, "test": model.test_results,
    }
    if not trainer.is_global_zero:  # DDP ranks 1..: the same (whole-split) results; rank 0 writes them
        return metrics
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_predictions(run_dir / "predictions.jsonl", dm, model.test_predictions)
    res = model.test_results
    print(f"[captioner] eval {metrics['model']} on {cfg.data.name}/{dm.test_split} (beam {model.decode_cfg['beam_size']}):"
          f" BLEU-4 {res['bleu_4']:.4f}, CIDEr {res['cider']:.3f} -> {run_dir}")
    return metrics
