"""LightningModules: a base with the shared step, and one subclass per model family, each wrapping a decoder that
Hydra builds from its config (`_target_`, conf/decoder/ and conf/attention/) over cached encoder features.

- `PooledCaptioner`: the image as one pooled vector (variants 1-4: RNN / LSTM decoders);
- `AttentionCaptioner`: the image as spatial tokens the decoder attends over (variants 5-6: the transformer,
  Show-Attend-Tell); it owns what attention brings: the doubly stochastic attention regulariser of Show, Attend
  and Tell (`alpha_c`), and the per-word attention maps of a few test images, kept in the run directory and
  logged to W&B.
Both share one step for train/val/test: teacher-forced cross-entropy ignoring padding; validation and test also
decode for real (greedy by default; beam search with `decode.beam_size>1`) and score against all references.
Under DDP each rank decodes its shard of the split; at the epoch end the outputs of all ranks are gathered and
deduplicated by image index (a DistributedSampler repeats images to even out the shards), so validation and test
metrics are those of the whole split, computed identically on every rank.
The checkpoint carries everything needed to caption new images later: vocabulary, the decoder's config
(`_target_` and settings), encoder spec (name, weights source, input size, transform settings). Hyper-parameters
are plain data (no module objects): the optimiser and scheduler factories are left out.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
import torch.nn.functional as F

from .data.vocabulary import Vocabulary
from .scst import SelfCritical
from .decoding import beam_search, greedy_decode, sample_captions, to_word_lists
from .scoring.metrics import validation_scores

log = logging.getLogger(__name__)

# Epoch-level caption metrics are computed from the outputs of ALL ranks (gathered in `gather_eval_outputs`), so
# they are already global and identical on every rank: logging them without sync_dist is right, not an oversight.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/(?!loss')")


# What `decode:` in conf/train.yaml sets; a checkpoint saved before a key existed gets its default here.
DECODE_DEFAULTS = {"beam_size": 1, "max_len": 30, "min_len": 1, "length_penalty": 0.0, "suppress_unk": True,
                   "block_trigrams": False, "sample": False, "temperature": 1.0, "top_k": 0}


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


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                           min_ratio: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """conf/scheduler/warmup_cosine.yaml: linear warm-up over `warmup_fraction` of the steps, then cosine decay to
    `min_ratio` of the learning rate, stepped every optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, int(warmup_fraction * total_steps), min_ratio))


def lr_scale(rule: str, batch_size: int, base_batch_size: int) -> float:
    """The factor `lr_scaling.rule` puts on optimizer.lr at an effective batch of `batch_size`: `sqrt` of the ratio to
    `base_batch_size` (Adam's rule: Malladi et al. 2022, the noise scale of adaptive updates grows with the square
    root of the batch), `linear` (SGD's: Goyal et al. 2017), or 1 for `none`."""
    ratio = batch_size / base_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def build_part(spec: Mapping[str, Any]) -> Callable:
    """A component's config as plain data (`_target_`, `_partial_: true`, settings; nested components alike) ->
    the factory Hydra builds from it. A checkpoint's spec is checked (captioner.checkpoint) before it gets here."""
    import hydra

    return hydra.utils.instantiate(dict(spec), _convert_="all")


class Captioner(L.LightningModule):
    """The shared step, epoch ends and optimisation; a family says which features its decoder reads (`feature`)."""

    family = "base"
    feature: str = ""  # "pooled" | "spatial": what the family feeds its decoder, and the feature cache it needs

    def __init__(
        self,
        vocab: Mapping[str, Any],
        decoder: Mapping[str, Any],
        encoder: Mapping[str, Any],
        model_name: str = "captioner",
        feature_dim: int = 1280,
        grid: tuple[int, int] = (7, 7),
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        label_smoothing: float = 0.0,
        decode: Mapping[str, Any] | None = None,
        meteor: bool = True,
        tokenizer: str = "auto",
        scst: Mapping[str, Any] | None = None,
        lr_scaling: Mapping[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # factories (optimizer, scheduler partials) stay out of the checkpoint's hyper-parameters, and so does how
        # the weights were trained (`scst`, `lr_scaling`): a captioner is used the same way after either stage
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "scst", "lr_scaling", "compile"])
        self.lr_scaling = dict(lr_scaling or {"rule": "none"})
        # `compile`: the teacher-forced training loss through torch.compile (fused kernels, fewer launches); the
        # step-by-step decoding of validation and test stays eager
        self.compile_training, self._compiled_loss = compile, None
        self.vocab = Vocabulary.from_dict(dict(vocab))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.decoder = self.build_decoder(decoder, feature_dim, tuple(grid))
        self.decode_cfg = {**DECODE_DEFAULTS, **dict(decode or {})}
        # stage=scst: training maximises the CIDEr-D of sampled captions (captioner.scst) instead of cross-entropy
        self.scst = SelfCritical(**dict(scst)) if scst else None
        self.reward = None  # its reward, built from the training references when fitting starts
        self._nonfinite: torch.Tensor | None = None  # (step, loss) of the first non-finite training loss, or -1s
        self.eval_outputs: list[dict] = []
        self.test_results: dict = {}
        self.test_predictions: list[dict] = []

    def build_decoder(self, spec: Mapping[str, Any], feature_dim: int, grid: tuple[int, int]) -> torch.nn.Module:
        """The decoder of its config, completed with what the data decides (vocabulary size, feature size, and for
        spatial features the grid); it must read the features this family feeds it."""
        factory = build_part(spec)
        cls = getattr(factory, "func", factory)
        if getattr(cls, "feature", None) != self.feature:
            raise ValueError(f"{type(self).__name__} feeds its decoder {self.feature} features, but "
                             f"{spec.get('_target_')} reads {getattr(cls, 'feature', None)} ones")
        return factory(vocab_size=len(self.vocab), **self.feature_sizes(feature_dim, grid))

    def feature_sizes(self, feature_dim: int, grid: tuple[int, int]) -> dict[str, Any]:
        """The sizes of the features this family feeds its decoder, as the decoder's arguments."""
        return {"feature_dim": feature_dim}

    # -- the shared step ------------------------------------------------------------------------------------
    def caption_loss(self, features: torch.Tensor, captions: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy ignoring padding; caption b describes image image_index[b]."""
        logits = self.decoder(features, captions, image_index)
        return self._cross_entropy(logits, captions)

    def _cross_entropy(self, logits: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), captions[:, 1:].reshape(-1),
                               ignore_index=self.vocab.pad_id, label_smoothing=self.hparams.label_smoothing)

    def training_loss(self, features: torch.Tensor, captions: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """What training minimises: the caption loss, plus what a family adds to it."""
        return self.caption_loss(features, captions, image_index)

    def training_loss_function(self) -> Callable:
        """`training_loss`, compiled on first use with `compile`: dynamic shapes, since batch sizes and caption
        lengths change from step to step and a graph per shape would recompile all the time."""
        if not self.compile_training:
            return self.training_loss
        if self._compiled_loss is None:
            self._compiled_loss = torch.compile(self.training_loss, dynamic=True)
        return self._compiled_loss

    def generate(self, features: torch.Tensor, **overrides) -> list[str]:
        """Captions of `features` under the decode config (`decode.*`, then `overrides`): every setting but the
        beam's own applies to greedy decoding, beam search and sampling (`sample`, with `temperature`, `top_k`)
        alike."""
        cfg = {**self.decode_cfg, **overrides}
        common = dict(max_len=cfg["max_len"], min_len=cfg["min_len"], sos_id=self.vocab.sos_id,
                      eos_id=self.vocab.eos_id, pad_id=self.vocab.pad_id,
                      suppress=[self.vocab.unk_id] if cfg["suppress_unk"] else [],
                      block_trigrams=cfg["block_trigrams"])
        if cfg["sample"]:
            ids = to_word_lists(sample_captions(self.decoder, features, 1, cfg["temperature"], cfg["top_k"], **common))
        elif cfg["beam_size"] > 1:
            ids = beam_search(self.decoder, features, beam_size=cfg["beam_size"],
                              length_penalty=cfg["length_penalty"], **common)
        else:
            ids = greedy_decode(self.decoder, features, **common)
        return [self.vocab.decode(x) for x in ids]

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        features, captions = batch["features"], batch["captions"]
        if stage == "train" and self.scst is not None:
            loss, logged = self.scst.loss(self.decoder, self.vocab, features, batch["index"], self.reward,
                                          self.decode_cfg)
            self._check_finite(loss)
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(features))
            for name, value in logged.items():
                self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=len(features))
            return loss
        if stage == "train":
            loss = self.training_loss_function()(features, captions, batch["caption_image"])
            self._check_finite(loss)
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(captions))
            return loss
        loss = self.caption_loss(features, captions, batch["caption_image"])
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=len(captions),
                 sync_dist=True)  # the mean over ranks under DDP (a no-op in one process)
        hypotheses = self.generate(features)
        self.eval_outputs.extend(
            {"index": int(i), "hypothesis": h, "references": r}
            for i, h, r in zip(batch["index"].tolist(), hypotheses, batch["references"]))
        return loss

    # How often a GPU's training loss is read on the host to check it is finite: reading it waits for the device to
    # finish the step (a sync that idles the GPU between steps), so on a GPU the first non-finite loss is recorded
    # on the device and read every this many steps, and always before anything is validated or saved. On the CPU
    # the read costs nothing: every step. None: that choice; a number: every that many steps on any device.
    finite_check_every: int | None = None

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop at the first NaN/inf training loss, naming its step, before any checkpoint holds what came after it:
        checkpoints are written at epoch ends, after this check, so the last one on disk is from before the
        divergence."""
        every = self.finite_check_every or (1 if loss.device.type == "cpu" else 50)
        if every == 1:
            if not torch.isfinite(loss):
                raise self._nonfinite_error(self.global_step, loss.item())
            return
        record = torch.stack([torch.full((), float(self.global_step), device=loss.device), loss.detach().float()])
        if self._nonfinite is None:
            self._nonfinite = torch.full_like(record, -1.0)
        fresh = ~torch.isfinite(record[1]) & (self._nonfinite[0] < 0)  # only the first one is kept
        self._nonfinite = torch.where(fresh, record, self._nonfinite)
        if (self.global_step + 1) % every == 0:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        if self._nonfinite is None:
            return
        step, value = self._nonfinite.tolist()
        if step >= 0:
            raise self._nonfinite_error(int(step), value)

    def _nonfinite_error(self, step: int, value: float) -> FloatingPointError:
        return FloatingPointError(
            f"training loss became {value} at step {step} (epoch {self.current_epoch}); nothing after the last "
            "finished epoch was saved, so checkpoints/last.ckpt is the last good state. Lower optimizer.lr (or use "
            "trainer.precision=32-true), then resume with ckpt_path=last")

    def on_validation_start(self) -> None:
        self.raise_if_nonfinite()

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite()

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def on_fit_start(self) -> None:
        """stage=scst: the reward's CIDEr-D document frequencies from the training references, computed once."""
        if self.scst is None or self.reward is not None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or getattr(dm, "train_batches", None) != "images":
            raise RuntimeError("stage=scst trains on batches of training images with all their references: build the "
                               "DataModule with train_batches='images' (train.py does this for stage=scst)")
        self.reward = self.scst.build_reward([r.captions for r in dm.records["train"]], self.hparams.tokenizer)

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
        scores = validation_scores([o["hypothesis"] for o in self.eval_outputs],
                                   [o["references"] for o in self.eval_outputs], tokenizer=self.hparams.tokenizer)
        for name, value in scores.items():
            self.log(f"val/{name}", value, prog_bar=name == "bleu_4")
        semantic = self._semantic("val")
        for name, value in semantic.items():
            self.log(f"val/{name}", value)

    def on_test_epoch_end(self) -> None:
        from .scoring.metrics import caption_metrics

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
        from .scoring.semantic import score_captions

        outs = self.eval_outputs
        return score_captions([o["hypothesis"] for o in outs], [scenes[o["index"]] for o in outs])

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        optimizer = factory(params=[p for p in self.parameters() if p.requires_grad])
        scale = self.lr_multiplier()
        for group in optimizer.param_groups:  # before the scheduler reads them as its base rates
            group["lr"] *= scale
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def effective_batch_size(self) -> int:
        """Captions (images for stage=scst) per optimiser step: the loader's batch on every rank, accumulated."""
        trainer = self.trainer
        return int(trainer.datamodule.batch_size) * trainer.world_size * trainer.accumulate_grad_batches

    def lr_multiplier(self) -> float:
        """What `lr_scaling` makes of optimizer.lr at this run's effective batch (`lr_scale`)."""
        rule = self.lr_scaling.get("rule", "none")
        if rule == "none" or getattr(self.trainer, "datamodule", None) is None:
            return 1.0
        batch, base = self.effective_batch_size(), int(self.lr_scaling["base_batch_size"])
        scale = lr_scale(rule, batch, base)
        if scale != 1.0:
            log.info("learning rate x%.3g for an effective batch of %d (lr_scaling.rule=%s, base_batch_size=%d)",
                     scale, batch, rule, base)
        return scale

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

    def write_test_outputs(self, run_dir: Path, records: list, loggers: list) -> None:
        """What this family keeps of a test beyond metrics.json and predictions.jsonl (global rank 0 calls it)."""


class PooledCaptioner(Captioner):
    """The image as one pooled vector (B, D): the decoder reads it as an input step or its initial state."""

    family = "pooled"
    feature = "pooled"


class AttentionCaptioner(Captioner):
    """The image as spatial tokens (B, h*w, D) that the decoder attends over.

    `alpha_c` weighs Show, Attend and Tell's doubly stochastic regulariser, alpha_c * mean over image tokens (and
    captions) of (1 - attention the token got over the caption's words)^2, which pushes the words to look at every
    part of the image in turn (0: off). The mean, as in the tutorial implementation, not the paper's sum: the
    cross-entropy here is a mean per word, and a sum over 49 tokens would outweigh it some 40-fold. `attention_maps`: how many test images keep the per-word attention maps of their
    generated caption (`attention_maps.json` in the run directory, and images in W&B)."""

    family = "attention"
    feature = "spatial"

    def __init__(self, alpha_c: float = 0.0, attention_maps: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha_c, self.attention_maps_kept = alpha_c, attention_maps
        self.attention_samples: list[dict] = []

    def feature_sizes(self, feature_dim: int, grid: tuple[int, int]) -> dict[str, Any]:
        """Spatial tokens come on a grid (row-major), whose shape the decoder's 2-D positions need."""
        return {"feature_dim": feature_dim, "grid": grid}

    def training_loss(self, features: torch.Tensor, captions: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        if not self.alpha_c:
            return self.caption_loss(features, captions, image_index)
        logits, att = self.decoder(features, captions, image_index, return_attention=True)
        words = (captions[:, 1:] != self.vocab.pad_id).to(att.dtype)  # positions that predict a word or <eos>
        seen = (att * words[..., None]).sum(dim=1)  # (B, T): attention each image token got over the caption
        return self._cross_entropy(logits, captions) + self.alpha_c * ((1 - seen.float()) ** 2).mean()

    # -- attention maps -------------------------------------------------------------------------------------
    @torch.no_grad()  # decoding steps under autocast: see captioner.decoding on inference_mode
    def attention_maps(self, features: torch.Tensor, words: list[list[str]]) -> list:
        """Replay each caption step by step and keep the last layer's cross-attention behind every word, as a
        (words, rows, columns) array per image (whatever search produced the caption, the map is what the decoder
        looked at for that word)."""
        import numpy as np

        vocab, decoder = self.vocab, self.decoder
        n = max((len(w) for w in words), default=0)
        ids = torch.full((len(words), n + 1), vocab.pad_id, dtype=torch.long)
        ids[:, 0] = vocab.sos_id
        for b, w in enumerate(words):
            ids[b, 1:len(w) + 1] = torch.tensor([vocab.stoi.get(t, vocab.unk_id) for t in w], dtype=torch.long)
        ids = ids.to(features.device)
        state = decoder.init_state(features)
        steps = []
        for t in range(n):
            _, state, att = decoder.step(ids[:, t], state, return_attention=True)
            steps.append(att.float().cpu())
        h, w = self.hparams.grid
        grid = torch.stack(steps, dim=1).view(len(words), n, h, w).numpy() if steps else \
            np.zeros((len(words), 0, h, w))
        return [grid[b, :len(wd)] for b, wd in enumerate(words)]

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.attention_samples = []

    def test_step(self, batch, batch_idx):
        loss = super().test_step(batch, batch_idx)
        wanted = self.attention_maps_kept - len(self.attention_samples)
        if wanted > 0:
            outs = self.eval_outputs[-len(batch["index"]):][:wanted]
            words = [o["hypothesis"].split() for o in outs]
            maps = self.attention_maps(batch["features"][:len(outs)], words)
            self.attention_samples += [{"index": o["index"], "words": w, "maps": m.round(4).tolist()}
                                       for o, w, m in zip(outs, words, maps)]
        return loss

    def write_test_outputs(self, run_dir: Path, records: list, loggers: list) -> None:
        """attention_maps.json (image key and path, words, one rows x columns map per word) and, with a W&B logger,
        one figure per image."""
        from .files import atomic_write_text

        samples = [{"image": records[s["index"]].key, "image_path": str(records[s["index"]].image),
                    "words": s["words"], "maps": s["maps"]} for s in self.attention_samples]
        atomic_write_text(Path(run_dir) / "attention_maps.json", json.dumps(samples))
        from .wandb_logging import attention_images, wandb_loggers

        for logger in wandb_loggers(loggers) if samples else []:
            try:
                figures = attention_images([(s["image_path"], s["words"], s["maps"]) for s in samples])
                logger.experiment.log({"test/attention_maps": figures})
            except Exception as e:  # a logging hiccup must not fail a finished run
                log.warning("could not log the attention maps to W&B: %s", e)
