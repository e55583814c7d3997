"""How a training run's own files are written: its checkpoints, its CSV history and its training clock.

Each of them must survive what can happen to a run — a full disk, `kill -9`, a resume that fails, a planted
symbolic link — without losing what was there before:

- `AtomicCheckpointIO` (the Trainer's checkpoint plugin): a checkpoint appears whole under its name or not at all
  (temp file beside it, fsync, rename; `captioner.files.atomic_write_bytes`); a full disk is one `DiskFullError`
  naming the checkpoint, and a link at a checkpoint's name is replaced or removed, never written or deleted through.
- `RunHistoryLogger` (`logger=csv`, also under `logger=wandb`): Lightning's CSVLogger, except that `csv/metrics.csv`
  is the run's whole history: a resume keeps the rows of the epochs before it (Lightning's deletes the file as soon
  as the logger starts, so a resume lost them, and a failed one left no file), and every write replaces the file
  atomically.
- `KeepHistoryOnResume` tells those loggers where training (re)starts, once the checkpoint is restored.
- `TrainingClock`: the seconds spent training, saved in every checkpoint and restored on resume, so that
  `train_seconds` in metrics.json counts every epoch of the run, not only those of its last process.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .files import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


# -- checkpoints --------------------------------------------------------------------------------------------------

class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made safe for a run's files: the checkpoint is serialised in memory, written
    to a temp file beside its name (created exclusively, never through a link), fsynced and renamed over the name.
    Lightning's own writer opens the final name and writes into it, so a full disk or a kill left a truncated file
    that a resume then failed on (or a planted link's target overwritten)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (checkpoints are local files)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())  # a full disk: DiskFullError naming `path`, no file left

    def remove_checkpoint(self, path) -> None:
        """An older checkpoint ModelCheckpoint no longer keeps. A link at its name is removed itself: deleting
        what it points at (possibly outside the run dir) is not this run's to do."""
        path = Path(path)
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        else:
            super().remove_checkpoint(path)  # a sharded checkpoint directory, or nothing


# -- the CSV history ----------------------------------------------------------------------------------------------

class RunHistoryLogger(CSVLogger):
    """Lightning's CSVLogger with a history that survives resumes. Until `resume_at` says where training
    (re)starts the file on disk is left exactly as it is (a resume that fails before training changes nothing);
    from then on every save writes the rows kept from before plus this process's rows, atomically."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_step = 0

    @property
    @rank_zero_experiment
    def experiment(self) -> RunHistoryWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = RunHistoryWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, epoch: int, global_step: int) -> None:
        """Training (re)starts at `epoch` after `global_step` optimizer steps (0, 0: a fresh start)."""
        self._last_step = global_step
        self.experiment.resume_at(epoch, global_step)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from lightning.fabric.utilities.logger import _add_prefix

        # Lightning numbers a row logged without a step by the count of unsaved rows (0, 1, ...), which would
        # place it at the start of the history: it belongs at the latest step.
        step = self._last_step if step is None else step
        self._last_step = max(self._last_step, step)
        self.experiment.log_metrics(_add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR), step)


class RunHistoryWriter(ExperimentWriter):
    """metrics.csv and hparams.yaml of one run, each replaced atomically on every write and never written through
    a link. Rows already on disk are read when the resume point is known and kept when they precede it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.kept: list[dict[str, str]] = []  # rows of the history from before this training started
        self.logged: list[dict[str, Any]] = []  # this training's rows, saved or not
        self.resumed = False
        self._saved_rows = 0
        self._columns: list[str] = []
        self._text = ""  # the CSV text of kept + saved rows: a save appends to it unless a new column appears

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here, when the logger starts: before a resume has even loaded its
        checkpoint. The history is only ever replaced whole, once training has (re)started."""

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        atomic_write_text(Path(self.log_dir) / self.NAME_HPARAMS_FILE, hparams_yaml(self.hparams))

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics_dict.items()}
        row["step"] = len(self.logged) if step is None else step
        self.logged.append(row)

    def resume_at(self, epoch: int, global_step: int) -> None:
        path = Path(self.metrics_file_path)
        if self.resumed:  # a second fit with the same logger: its rows so far are history now
            self.save()
            self.logged, self._saved_rows = [], 0
        rows = read_history(path)
        self.kept = [row for row in rows if precedes(row, epoch, global_step)]
        if rows and epoch == 0 and global_step == 0:
            set_aside(path)  # a fresh start in a directory with another run's history: kept beside, not mixed in
        elif len(self.kept) < len(rows):
            log.info("%s: %d rows from after the resumed checkpoint (epoch %d, step %d) will be logged again",
                     path, len(rows) - len(self.kept), epoch, global_step)
        self._columns, self._text = [], ""
        self.resumed = True

    def save(self) -> None:
        if not self.resumed or len(self.logged) == self._saved_rows:
            return  # nothing new, or training has not started: the history on disk is not known to be ours yet
        new = self.logged[self._saved_rows:]
        if not self._columns or not set().union(*new) <= set(self._columns):
            rows = [*self.kept, *self.logged]
            self._columns = sorted({k for row in rows for k in row if k is not None})
            self._text = history_csv(self._columns, rows, header=True)
        else:
            self._text += history_csv(self._columns, new, header=False)
        atomic_write_text(Path(self.metrics_file_path), self._text)
        self._saved_rows = len(self.logged)


def precedes(row: dict[str, str], epoch: int, global_step: int) -> bool:
    """Whether a history row was logged before training (re)started at `epoch` after `global_step` steps.
    Epoch-level rows carry their epoch; the learning-rate rows carry only the step at which they were logged
    (the first step of their epoch). A row of a partly finished epoch is neither: its epoch is trained again."""
    row_epoch, row_step = number(row.get("epoch")), number(row.get("step"))
    if row_epoch is not None:
        return row_epoch < epoch
    return row_step is not None and row_step < global_step


def number(value: str | None) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_history(path: Path) -> list[dict[str, str]]:
    """The rows of metrics.csv; none for a missing file or a link planted at its name (whatever it points at is
    not this run's history, and the link is replaced at the next save)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("%s: not read (%s): the history is started anew", path, e.strerror)
        return []
    with os.fdopen(fd, newline="", encoding="utf-8", errors="replace") as f:
        return [dict(row) for row in csv.DictReader(f)]


def history_csv(columns: list[str], rows: list[dict[str, Any]], header: bool) -> str:
    """CSV text in Lightning's layout: one column per key ever logged, sorted; a row leaves the others empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def set_aside(path: Path) -> None:
    """Rename an earlier run's history out of the way (metrics.csv -> metrics.before-<time>.csv)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.lstat().st_mtime))
    aside = path.with_name(f"{path.stem}.before-{stamp}{path.suffix}")
    os.replace(path, aside)
    log.warning("%s: a fresh run started in a directory with an earlier run's history; that history was moved "
                "to %s", path, aside.name)


def hparams_yaml(hparams: dict[str, Any]) -> str:
    """hparams.yaml's text, as Lightning writes it (OmegaConf's YAML, plain YAML for what OmegaConf refuses)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_yaml(OmegaConf.create(hparams), resolve=True)
    except OmegaConfBaseException:
        import yaml

        return yaml.safe_dump({k: v for k, v in hparams.items() if _plain(v)}, sort_keys=False)


def _plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, tuple, dict))


class KeepHistoryOnResume(L.Callback):
    """Tells each RunHistoryLogger where training (re)starts — the epoch and step the restored checkpoint left
    off at, (0, 0) for a fresh run — once any checkpoint is restored (under every strategy, before the first
    training batch)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, RunHistoryLogger):
                logger.resume_at(trainer.current_epoch, trainer.global_step)


# -- the training clock -------------------------------------------------------------------------------------------

class TrainingClock(L.Callback):
    """Seconds spent training this run (from the start of training to its end, validation included), across
    resumes: the total so far is saved in every checkpoint and restored from the one a run resumes from. Time
    after the last checkpoint of a process that was killed is not counted: that epoch is trained again."""

    def __init__(self) -> None:
        self._before = 0.0  # seconds trained by earlier processes (from the restored checkpoint) or earlier fits
        self._started: float | None = None

    @property
    def seconds(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._before + running

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before, self._started = self.seconds, None

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        seconds = state_dict.get("seconds") if isinstance(state_dict, dict) else None
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < math.inf:
            self._before = float(seconds)
        else:  # an edited checkpoint: the clock only informs, it is no reason to refuse the resume
            log.warning("the checkpoint's training clock (%r) is not a number of seconds: counting from 0", seconds)
            self._before = 0.0


def training_seconds(trainer: L.Trainer, this_process: float) -> float:
    """Seconds this run has trained, all resumes included (its TrainingClock); without a clock among the
    callbacks, only `this_process`'s."""
    clocks = [c for c in trainer.callbacks if isinstance(c, TrainingClock)]
    return clocks[0].seconds if clocks else this_process


def checkpoint_plugins() -> list:
    """The Trainer plugins every run uses to write its checkpoints."""
    return [AtomicCheckpointIO()]
