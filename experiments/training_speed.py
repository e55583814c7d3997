"""Training throughput at COCO scale on synthetic cached features: today's path against the fast one, per variant.

A COCO-sized training split (default 100k images x 5 captions, a 9,487-word vocabulary as Karpathy's COCO with
min count 5, caption lengths as COCO's: mean ~10.5 words) with features of the real encoders' shapes (DINOv2
ViT-S/14 at 224 px: a 384-d CLS vector, 16x16 patch tokens of 384), random values: throughput does not depend on
them. For each variant, through Lightning's real training loop (`trainer.fit`, the LightningModule's own step):

  before  the features read per batch from a .npy cache by the DataLoader (the reader `loader.resident=false`
          uses), loader.batch_size=64, eager;
  after   `loader.resident` (one tensor on the device, batches gathered there), a large batch (--batch-size), and
          with --compile the training loss through torch.compile;

captions/s of each, their ratio; and for `after` the step split by a synchronised manual loop (data, forward +
backward, optimizer; overhead = Lightning's step time minus those), model FLOPs per caption (torch's FLOP counter,
forward + backward) and the model FLOPs utilisation against the device's dense bf16 peak.

usage: python experiments/training_speed.py [--device cuda] [--images 100000] [--batch-size 1024] [--compile]
       [--variants ...] [--steps 60] [--out training_speed.json]   (benchmark.py --cuda runs it on the GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Dense bf16 peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
ENCODER_SHAPES = {"pooled": (384,), "spatial": (256, 384)}  # DINOv2 ViT-S/14 at 224 px: CLS, 16x16 patches
GRID = (16, 16)
COCO_VOCAB = 9_487


def sync(device: str) -> None:
    """Wait for the device: CUDA runs asynchronously, so work is over when the device is done."""
    if device == "cuda":
        torch.cuda.synchronize()


def coco_like_captions(n_images: int, per_image: int, vocab_size: int, max_length: int, seed: int):
    """(caption's image row, padded token ids with <sos>/<eos>, lengths in tokens): COCO-like lengths (words ~
    N(10.5, 2.4) clipped to [5, max_length]), Zipf-distributed words."""
    rng = np.random.default_rng(seed)
    n = n_images * per_image
    words = np.clip(np.rint(rng.normal(10.5, 2.4, n)), 5, max_length).astype(np.int32)
    lengths = words + 2
    tokens = np.zeros((n, max_length + 2), dtype=np.int32)
    ranks = np.minimum(rng.zipf(1.2, size=(n, max_length)), vocab_size - 4)
    body = (ranks + 3).astype(np.int32)  # ids 4.. are words (0-3: <pad> <sos> <eos> <unk>)
    tokens[:, 0] = 1
    mask = np.arange(max_length)[None, :] < words[:, None]
    tokens[:, 1:max_length + 1] = np.where(mask, body, 0)
    tokens[np.arange(n), words + 1] = 2
    return np.repeat(np.arange(n_images), per_image), tokens, lengths


def write_features(path: Path, n_images: int, shape: tuple[int, ...], seed: int) -> np.memmap:
    """A .npy of float16 features (n_images, *shape), written chunk by chunk as an extraction writes a cache."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n_images, *shape))
    g = torch.Generator().manual_seed(seed)
    step = max(1, (64 << 20) // (2 * int(np.prod(shape))))
    for a in range(0, n_images, step):
        b = min(n_images, a + step)
        array[a:b] = torch.rand((b - a, *shape), generator=g, dtype=torch.float32).to(torch.float16).numpy()
    array.flush()
    return np.load(path, mmap_mode="r")


def build_variant(name: str, vocab_size: int, batch_size: int, compile: bool):
    """The variant's LightningModule as train.py builds it (its own encoder's feature sizes, its optimiser, the
    warm-up + cosine schedule, lr_scaling), for `batch_size` captions a step."""
    from captioner.config import compose
    from captioner.data.vocabulary import SPECIALS, Vocabulary
    from captioner.encoders import EncoderSpec
    from captioner.training import build_model, model_family

    cfg = compose([f"model={name}", "experiment=none", f"loader.batch_size={batch_size}", f"compile={compile}"])
    feature = model_family(cfg).feature
    vocab = Vocabulary.from_dict({"itos": list(SPECIALS) + [f"w{i}" for i in range(vocab_size - len(SPECIALS))]})
    dm = SimpleNamespace(vocab=vocab, encoder_spec=EncoderSpec.from_config(cfg.encoder),
                         feature_dim=ENCODER_SHAPES["pooled"][0], grid=GRID)
    return cfg, feature, build_model(cfg, dm)


def batches(features, pairs, batch_size: int, resident: bool, device: str, seed: int):
    """Today's loader (per-batch reads from the .npy, DataLoader, pinned on a GPU) or the resident batches."""
    from torch.utils.data import DataLoader

    from captioner.data.datamodule import (CaptionPairs, GroupedBatches, ResidentBatches, ResidentRows,
                                           _batch_identity, _FeatureRows)

    cache = SimpleNamespace(spatial=features, pooled=features, path=str(features.filename))
    reader = _FeatureRows(cache, "spatial" if features.ndim == 3 else "pooled")
    sampler = GroupedBatches(pairs.rows, batch_size, seed, lengths=pairs.lengths)
    if resident:
        return ResidentBatches(ResidentRows.load(reader, torch.device(device)), pairs, sampler)
    return DataLoader(CaptionPairs(reader, pairs.rows, pairs.tokens, pairs.lengths), batch_sampler=sampler,
                      collate_fn=_batch_identity, pin_memory=device == "cuda")


class _Clock:
    """Wall time and captions of the steps after `warmup` (compilation and the first epoch's setup excluded)."""

    def __init__(self, warmup: int, device: str) -> None:
        import lightning as L

        clock = self

        class Callback(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if trainer.global_step == warmup:
                    sync(device)
                    clock.t0, clock.captions = time.perf_counter(), 0

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                clock.captions += len(batch["captions"])

            def on_train_end(self, trainer, module):
                sync(device)
                clock.seconds = time.perf_counter() - clock.t0
                clock.steps = trainer.global_step - warmup

        self.callback, self.t0, self.captions = Callback(), None, 0


def lightning_throughput(model, loader, cfg, steps: int, warmup: int, device: str) -> dict:
    """captions/s and seconds per step through `trainer.fit` (the real step: logging, clipping, the scheduler)."""
    import lightning as L

    from captioner.config import resolve_precision

    clock = _Clock(warmup, device)
    accelerator = "gpu" if device == "cuda" else "cpu"
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=resolve_precision("auto", accelerator),
                        max_steps=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=cfg.trainer.gradient_clip_val, callbacks=[clock.callback])
    trainer.fit(model, train_dataloaders=loader)
    return {"captions_per_s": clock.captions / clock.seconds, "step_s": clock.seconds / clock.steps,
            "precision": str(trainer.precision)}


def step_split(model, loader, steps: int, device: str) -> dict:
    """Seconds per step of each phase, synchronised between phases: producing the batch (and moving it to the
    device), forward + backward, clipping + optimizer step; and the model FLOPs of one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from captioner.config import resolve_precision

    model.to(device).train()
    optimizer = model.optimizer_factory(params=[p for p in model.parameters() if p.requires_grad])
    bf16 = resolve_precision("auto", "gpu" if device == "cuda" else "cpu") == "bf16-mixed"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    loss_fn = model.training_loss_function()

    it = iter(loader)
    phases = {"data": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    captions, flops_per_caption = 0, None
    for step in range(steps + 2):  # two warm-up steps (compilation, allocator)
        sync(device)
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync(device)
        t1 = time.perf_counter()
        if flops_per_caption is None:  # counted once, eagerly (the counter does not see inside compiled code)
            with FlopCounterMode(display=False) as counter, autocast:
                model.training_loss(batch["features"], batch["captions"], batch["caption_image"]).backward()
            flops_per_caption = counter.get_total_flops() / len(batch["captions"])
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            t1 = time.perf_counter()
        with autocast:
            loss = loss_fn(batch["features"], batch["captions"], batch["caption_image"])
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if step >= 2:
            phases["data"] += t1 - t0
            phases["forward_backward"] += t2 - t1
            phases["optimizer"] += t3 - t2
            captions += len(batch["captions"])
    return {**{f"{k}_s": v / steps for k, v in phases.items()}, "flops_per_caption": flops_per_caption,
            "captions_per_step": captions / steps}


def measure(variants, images: int, batch_size: int, compile: bool, steps: int, device: str, seed: int = 0,
            workdir: Path | None = None) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix="captioner-speed-", dir=workdir)
    rows, tokens, lengths = coco_like_captions(images, 5, COCO_VOCAB, 30, seed)
    pairs = SimpleNamespace(rows=rows, tokens=tokens, lengths=lengths)
    features = {kind: write_features(Path(tmp.name) / f"{kind}.npy", images, shape, seed)
                for kind, shape in ENCODER_SHAPES.items()}
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = {"device": name, "images": images, "captions": len(rows), "batch_size": batch_size, "compile": compile,
           "peak_bf16_flops": peak, "variants": {}}
    warmup = 5
    for variant in variants:
        torch.manual_seed(seed)
        cfg, feature, model = build_variant(variant, COCO_VOCAB, 64, False)
        before = lightning_throughput(model, batches(features[feature], pairs, 64, False, device, seed), cfg, steps,
                                      warmup, device)
        cfg, _, model = build_variant(variant, COCO_VOCAB, batch_size, compile)
        loader = batches(features[feature], pairs, batch_size, True, device, seed)
        after = lightning_throughput(model, loader, cfg, steps, warmup, device)
        split = step_split(model, loader, max(5, steps // 3), device)
        split["overhead_s"] = max(0.0, after["step_s"] - split["data_s"] - split["forward_backward_s"]
                                  - split["optimizer_s"])
        achieved = split["flops_per_caption"] * after["captions_per_s"]
        out["variants"][variant] = {
            "before": before, "after": after, "speedup": after["captions_per_s"] / before["captions_per_s"],
            "split": split, "model_tflops_per_s": achieved / 1e12, "mfu": achieved / peak if peak else None}
        del model, loader
        if device == "cuda":
            torch.cuda.empty_cache()
        print(render_row(variant, out["variants"][variant]), flush=True)
    tmp.cleanup()
    return out


def render_row(variant: str, r: dict) -> str:
    s = r["split"]
    mfu = f", MFU {100 * r['mfu']:.1f} %" if r["mfu"] is not None else ""
    return (f"  {variant:<15} {r['before']['captions_per_s']:>9,.0f} -> {r['after']['captions_per_s']:>9,.0f} "
            f"captions/s ({r['speedup']:.1f}x); step {1e3 * r['after']['step_s']:.2f} ms = data "
            f"{1e3 * s['data_s']:.2f} + fwd/bwd {1e3 * s['forward_backward_s']:.2f} + optimizer "
            f"{1e3 * s['optimizer_s']:.2f} + overhead {1e3 * s['overhead_s']:.2f} ms; "
            f"{s['flops_per_caption'] / 1e9:.2f} GFLOP/caption, {r['model_tflops_per_s']:.2f} TFLOP/s{mfu}")


def main(argv=None) -> int:
    from captioner.config import variants

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--variants", nargs="+", default=variants())
    ap.add_argument("--steps", type=int, default=60, help="timed steps per measurement (after 5 warm-up steps)")
    ap.add_argument("--out", default=str(REPO / "training_speed.json"))
    args = ap.parse_args(argv)
    print(f"{args.images:,} images x 5 captions, {args.device}: loader.batch_size=64 from the cache -> resident, "
          f"batch {args.batch_size}{', compiled' if args.compile else ''}", flush=True)
    result = measure(args.variants, args.images, args.batch_size, args.compile, args.steps, args.device)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
