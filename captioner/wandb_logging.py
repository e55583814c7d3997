"""What a run shows in W&B, where users compare the variants (`logger=wandb`, the default).

- `wandb_logger`: conf/logger/wandb.yaml's logger, in the W&B mode of the standard `WANDB_MODE` (offline when it
  is unset, so that a run needs no network; `disabled`: no W&B run at all);
- `ValidationSamples` (conf/callbacks/default.yaml): after every validation epoch, a `val/samples` table of the
  first few validation images with their references and the current caption (and, for attention models, figures
  of the attention behind each word), so the dashboard shows the captions improving epoch by epoch;
- `log_test_samples`, `write_summary`, `finish`: at the end of a run, a table of test captions, the run's summary
  (test metrics, size, best validation score: the columns of the W&B runs table), and closing the run.
Logging to W&B is a side show: every hiccup there is a warning, never the failure of a run.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from .errors import ConfigError

log = logging.getLogger(__name__)

# WANDB_MODE's values -> the mode the run gets (W&B still accepts its older names `dryrun` and `run`); None: no run.
MODES = {"offline": "offline", "dryrun": "offline", "online": "online", "run": "online", "disabled": None}


def wandb_logger(mode: str | None = "offline", **settings: Any) -> WandbLogger | None:
    """Lightning's WandbLogger (`settings`: its arguments and wandb.init's) in W&B mode `mode` (the config passes
    WANDB_MODE); None for `disabled`. The mode goes to wandb.init itself rather than through Lightning's `offline`,
    which would overwrite WANDB_MODE for the rest of the process (a multirun's later jobs included)."""
    if "offline" in settings:
        raise ConfigError("logger.wandb.offline is no longer read: the standard WANDB_MODE decides (online | offline "
                          "| disabled; offline when unset), or logger.wandb.mode=... for one run; drop the offline key")
    if os.environ.get("WANDB_OFFLINE") and not os.environ.get("WANDB_MODE"):
        log.warning("WANDB_OFFLINE is no longer read: W&B runs offline unless WANDB_MODE=online (after `wandb login`)")
    run = run_mode(mode)
    if run is None:
        return None
    if run == "offline" and settings.get("log_model"):
        raise ConfigError(f"logger.wandb.log_model={settings['log_model']} uploads checkpoints, which an offline W&B "
                          "run cannot: set WANDB_MODE=online (after `wandb login`), or logger.wandb.log_model=false")
    return WandbLogger(mode=run, **settings)


def run_mode(mode: str | None) -> str | None:
    """The W&B mode of `logger.wandb.mode` (WANDB_MODE): online | offline, or None for disabled (no run); checked
    by train.py before anything is built, so that a typo does not wait for the feature cache."""
    chosen = str(mode or "offline").strip().lower()  # WANDB_MODE="" counts as unset
    if chosen not in MODES:
        raise ConfigError(f"logger.wandb.mode={mode!r} (from WANDB_MODE) cannot work: allowed is online | offline | "
                          "disabled; set WANDB_MODE to one of them, or unset it to run offline")
    return MODES[chosen]


def wandb_loggers(loggers: Sequence) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def sample_row(record, output: Mapping) -> list:
    """An evaluated image as a table row: the image, its references, the generated caption."""
    import wandb

    return [wandb.Image(str(record.image)), " | ".join(output["references"]), output["hypothesis"]]


def attention_images(captions: Sequence[tuple[Any, Sequence[str], Any]]) -> list:
    """The per-word attention figures (captioner.caption.attention_figure) of (image path, words, maps) captions as
    W&B images, padded with white to one size: W&B shows a list of images of mixed sizes distorted (a figure's
    height grows with its caption's length)."""
    import numpy as np
    import wandb
    from PIL import Image

    from .caption import attention_figure
    from .images import load_image

    figures = [attention_figure(load_image(path), words, np.asarray(maps)) for path, words, maps in captions]
    size = (max((f.width for f in figures), default=0), max((f.height for f in figures), default=0))
    padded = []
    for figure in figures:
        canvas = Image.new("RGB", size, "white")
        canvas.paste(figure, (0, 0))
        padded.append(canvas)
    return [wandb.Image(f, caption=" ".join(words)) for f, (_, words, _) in zip(padded, captions)]


class ValidationSamples(L.Callback):
    """After every validation epoch (not the sanity check), with a W&B logger: the `val/samples` table of the first
    `n` validation images (a fixed set: the dashboard follows the same images across epochs) with columns epoch,
    image, references, caption; and for a family with attention maps (`attention_maps(features, words)`) the
    `val/attention_maps` images, one figure per image of the map behind each word of its caption (media rather than
    a table column: an offline run keeps them in its run dir, while a table's images wait in W&B's staging area,
    $WANDB_DATA_DIR, for `wandb sync`). Global rank 0 logs; the captions are those every rank gathered, the maps
    come from the features rank 0 kept of its own validation batches (under DDP an image another rank decoded gets
    no figure, rather than gathering features)."""

    def __init__(self, n: int = 8) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"callbacks.val_samples.n={n!r} cannot work: allowed is an integer >= 0 (0: no table)")
        self.n = n
        self.features: dict[int, torch.Tensor] = {}

    def _active(self, trainer: L.Trainer) -> bool:
        return self.n > 0 and trainer.is_global_zero and not trainer.sanity_checking and \
            bool(wandb_loggers(trainer.loggers))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.features = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._active(trainer) or not callable(getattr(pl_module, "attention_maps", None)):
            return
        for row, index in enumerate(batch["index"].tolist()):
            if index < self.n:  # only these few rows: a validation batch's features can be large
                self.features[index] = batch["features"][row].detach().clone()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the module's epoch end, which gathered this epoch's captions of the whole split."""
        if not self._active(trainer):
            return
        try:
            self._log(trainer, pl_module)
        except Exception as e:  # a logging hiccup must not fail the run
            log.warning("could not log the validation samples to W&B: %s", e)
        finally:
            self.features = {}

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import wandb

        outputs = pl_module.eval_outputs[:self.n]  # sorted by image index: the same images every epoch
        records = trainer.datamodule.records["val"]
        rows = [[trainer.current_epoch, *sample_row(records[o["index"]], o)] for o in outputs]
        logged = {"val/samples": wandb.Table(columns=["epoch", "image", "references", "caption"], data=rows)}
        figures = self._attention_figures(trainer, pl_module, outputs, records)
        if figures:
            logged["val/attention_maps"] = figures
        for logger in wandb_loggers(trainer.loggers):
            logger.log_metrics(logged, step=trainer.global_step)

    def _attention_figures(self, trainer, pl_module, outputs: list[dict], records) -> list:
        """The attention figure of each output whose features this rank kept."""
        here = [o for o in outputs if o["index"] in self.features]
        if not here:
            return []
        words = [o["hypothesis"].split() for o in here]
        features = torch.stack([self.features[o["index"]] for o in here]).to(pl_module.device)
        with trainer.precision_plugin.forward_context():  # the maps as the run's precision decodes them
            maps = pl_module.attention_maps(features, words)
        return attention_images([(records[o["index"]].image, w, m) for o, w, m in zip(here, words, maps)])


def log_test_samples(loggers: Sequence, records, predictions: list[dict], n: int = 16) -> None:
    """A `test/samples` table of the first `n` test images with their references and the generated caption."""
    if not predictions:
        return
    for logger in wandb_loggers(loggers):
        try:
            rows = [sample_row(records[p["index"]], p) for p in predictions[:n]]
            logger.log_table(key="test/samples", columns=["image", "references", "generated"], data=rows)
        except Exception as e:  # a logging hiccup must not fail a finished run
            log.warning("could not log the sample table to W&B: %s", e)


# What of metrics.json the W&B runs table shows beside the test metrics: which variant, how big, how it trained.
SUMMARY_KEYS = ("model", "family", "encoder", "decoder", "attention", "stage", "data", "params_trainable",
                "best_val_bleu_4", "best_val_cider", "best_epoch", "epochs", "train_seconds", "caption_prior_bleu_4",
                "world_size", "seed")


def run_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B summary of a finished run from its metrics.json: the numeric test metrics as `test/<name>`, then
    `SUMMARY_KEYS`; unknown values (None: METEOR without Java, the score not monitored) are left out."""
    summary = {f"test/{k}": v for k, v in (metrics.get("test") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary.update({k: metrics[k] for k in SUMMARY_KEYS if metrics.get(k) is not None})
    return summary


def write_summary(loggers: Sequence, metrics: Mapping[str, Any]) -> None:
    """The run's W&B summary (`run_summary`): one row per run in the runs table, comparable column by column."""
    for logger in wandb_loggers(loggers):
        try:
            logger.experiment.summary.update(run_summary(metrics))
        except Exception as e:  # a logging hiccup must not fail a finished run
            log.warning("could not write the run summary to W&B: %s", e)


def finish(loggers: Sequence) -> None:
    """Close this run's W&B run: in a multirun all jobs share one process, and without this every later job
    would log into the first job's W&B run."""
    if wandb_loggers(loggers):
        import wandb

        wandb.finish()
