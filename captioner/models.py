"""LightningModules: one per model family, wrapping a swappable decoder over cached encoder features.

- `RecurrentCaptioner` (variants 1-4): a pooled image vector into an RNN/LSTM decoder;
- `AttentionCaptioner` (variant 5): spatial tokens into the transformer decoder.
Both share one step for train/val/test: teacher-forced cross-entropy ignoring padding; validation and test also
decode for real (greedy by default; beam search with `decode.beam_size>1`) and score against all references.
Under DDP each rank decodes its shard of the split; at the epoch end the outputs of all ranks are gathered and
deduplicated by image index (a DistributedSampler repeats images to even out the shards), so validation and test
metrics are those of the whole split, computed identically on every rank.
The checkpoint carries everything needed to caption new images later: vocabulary, decoder config, encoder spec
(name, weights source, input size, transform settings). Hyper-parameters are plain data (no module objects).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import lightning as L
import torch
import torch.nn.functional as F

from .data.vocabulary import Vocabulary
from .decoders import build_decoder
from .decoding import beam_search, greedy_decode
from .metrics import val_bleu_scores

# Epoch-level caption metrics are computed from the outputs of ALL ranks (gathered in `gather_eval_outputs`), so
# they are already global and identical on every rank: logging them without sync_dist is right, not an oversight.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/(?!loss')")


# What `decode:` in conf/train.yaml sets; a checkpoint saved before a key existed gets its default here.
DECODE_DEFAULTS = {"beam_size": 1, "max_len": 30, "min_len": 1, "length_penalty": 0.0, "suppress_unk": True}


def _distributed() -> bool:
    """Several processes (DDP) share this run."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.05) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to `min_ratio`."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


class Captioner(L.LightningModule):
    family = "base"

    def __init__(
        self,
        vocab: Mapping[str, Any],
        decoder: Mapping[str, Any],
        encoder: Mapping[str, Any],
        model_name: str = "captioner",
        feature_dim: int = 1280,
        grid: tuple[int, int] = (7, 7),
        optimizer: Callable | None = None,
        scheduler: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        decode: Mapping[str, Any] | None = None,
        meteor: bool = True,
        tokenizer: str = "auto",
    ) -> None:
        super().__init__()
        # module objects (optimizer partial) stay out of the checkpoint's hyper-parameters
        self.save_hyperparameters(ignore=["optimizer"])
        self.vocab = Vocabulary.from_dict(dict(vocab))
        self.optimizer_factory = optimizer
        dec_cfg = dict(decoder)
        extra = {"grid": tuple(grid)} if dec_cfg.get("name") == "transformer" else {}
        self.decoder = build_decoder(**dec_cfg, vocab_size=len(self.vocab), feature_dim=feature_dim, **extra)
        self.decode_cfg = {**DECODE_DEFAULTS, **dict(decode or {})}
        self.eval_outputs: list[dict] = []
        self.test_results: dict = {}
        self.test_predictions: list[dict] = []

    # -- the shared step ------------------------------------------------------------------------------------
    def caption_loss(self, features: torch.Tensor, captions: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy ignoring padding; caption b describes image image_index[b]."""
        logits = self.decoder(features, captions, image_index)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), captions[:, 1:].reshape(-1),
                               ignore_index=self.vocab.pad_id, label_smoothing=self.hparams.label_smoothing)

    def generate(self, features: torch.Tensor, **overrides) -> list[str]:
        """Captions of `features` under the decode config (`decode.*`, then `overrides`): every setting but the
        beam's own applies to greedy decoding and beam search alike."""
        cfg = {**self.decode_cfg, **overrides}
        common = dict(max_len=cfg["max_len"], min_len=cfg["min_len"], sos_id=self.vocab.sos_id,
                      eos_id=self.vocab.eos_id, pad_id=self.vocab.pad_id,
                      suppress=[self.vocab.unk_id] if cfg["suppress_unk"] else [])
        if cfg["beam_size"] > 1:
            ids = beam_search(self.decoder, features, beam_size=cfg["beam_size"],
                              length_penalty=cfg["length_penalty"], **common)
        else:
            ids = greedy_decode(self.decoder, features, **common)
        return [self.vocab.decode(x) for x in ids]

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        features, captions = batch["features"], batch["captions"]
        loss = self.caption_loss(features, captions, batch["caption_image"])
        if stage == "train":
            self._check_finite(loss)
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(captions))
            return loss
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=len(captions),
                 sync_dist=True)  # the mean over ranks under DDP (a no-op in one process)
        hypotheses = self.generate(features)
        self.eval_outputs.extend(
            {"index": int(i), "hypothesis": h, "references": r}
            for i, h, r in zip(batch["index"].tolist(), hypotheses, batch["references"]))
        return loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop at the first NaN/inf training loss, before it reaches the weights: checkpoints are only written at
        epoch ends, so the last one on disk is from before the divergence."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "nothing after the last finished epoch was saved, so checkpoints/last.ckpt is the last good state. "
                "Lower optimizer.lr (or use trainer.precision=32-true), then resume with ckpt_path=last")

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    # -- epoch ends -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.eval_outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def gather_eval_outputs(self) -> list[dict]:
        """This epoch's eval outputs of the WHOLE split: those of every rank under DDP (one per image: the images a
        DistributedSampler repeated to pad the last shard are dropped), sorted by image index. The same list on
        every rank; in one process simply this process's outputs, sorted."""
        outs = self.eval_outputs
        if _distributed():
            per_rank: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, outs)
            outs = [o for rank_outs in per_rank for o in rank_outs]
        unique = {}
        for o in outs:
            unique.setdefault(o["index"], o)  # a padded repeat decodes the same image to the same caption
        return [unique[i] for i in sorted(unique)]

    def on_validation_epoch_end(self) -> None:
        self.eval_outputs = self.gather_eval_outputs()
        bleu = val_bleu_scores([o["hypothesis"] for o in self.eval_outputs],
                               [o["references"] for o in self.eval_outputs], tokenizer=self.hparams.tokenizer)
        for name, value in bleu.items():
            self.log(f"val/{name}", value, prog_bar=name == "bleu_4")
        semantic = self._semantic("val")
        for name, value in semantic.items():
            self.log(f"val/{name}", value)

    def on_test_epoch_end(self) -> None:
        from .metrics import caption_metrics

        outs = self.gather_eval_outputs()
        self.eval_outputs = outs
        results = None
        # scored once, on global rank 0 (METEOR starts a Java process), then sent to the other ranks
        if self.global_rank == 0:
            results = caption_metrics([o["hypothesis"] for o in outs], [o["references"] for o in outs],
                                      meteor=self.hparams.meteor, tokenizer=self.hparams.tokenizer)
        if _distributed():
            box = [results]
            torch.distributed.broadcast_object_list(box, src=0)
            results = box[0]
        dm = getattr(self.trainer, "datamodule", None)
        results.update(self._semantic(getattr(dm, "test_split", "test")))
        self.test_results, self.test_predictions = results, outs
        for name, value in results.items():
            if value is not None:
                self.log(f"test/{name}", float(value))

    def _semantic(self, split: str) -> dict[str, float]:
        """Shapes world only: is the caption RIGHT (objects, sizes, relations), not just well-worded."""
        dm = getattr(self.trainer, "datamodule", None)
        scenes = dm.scenes(split) if dm is not None else None
        if not scenes or not self.eval_outputs:
            return {}
        from .data.shapes import score_captions

        outs = self.eval_outputs
        return score_captions([o["hypothesis"] for o in outs], [scenes[o["index"]] for o in outs])

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        optimizer = factory(params=[p for p in self.parameters() if p.requires_grad])
        sched = dict(self.hparams.scheduler or {})
        if not sched or sched.get("name", "warmup_cosine") == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(sched.get("warmup_fraction", 0.05) * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total, warmup, sched.get("min_ratio", 0.05)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, also for the fused AdamW (conf/optimizer/adamw.yaml) under bf16-mixed. Lightning's
        mixed-precision plugin refuses any fused optimizer because under fp16 such an optimizer unscales the
        gradients itself, after clipping would have seen them scaled. Without a grad scaler (bf16, fp32) the
        gradients are the true ones, so they are clipped here by the plugin's base implementation."""
        from lightning.pytorch.plugins.precision import Precision

        plugin = self.trainer.precision_plugin
        if gradient_clip_val and getattr(plugin, "scaler", None) is None:
            algorithm = gradient_clip_algorithm or "norm"
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class RecurrentCaptioner(Captioner):
    """Variants 1-4: pooled vector -> RNN / LSTM (image as first step or as initial state)."""

    family = "recurrent"


class AttentionCaptioner(Captioner):
    """Variant 5: spatial tokens -> self-attention encoder -> masked self-attention + cross-attention decoder."""

    family = "attention"


FAMILIES = {"recurrent": RecurrentCaptioner, "attention": AttentionCaptioner}
