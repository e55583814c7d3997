"""Where the suite stands against its limits: every figure measured side by side in one run on this machine,
printed beside its goal and written to benchmark.json.

usage: python experiments/benchmark.py [--out benchmark.json] [--smoke] [--ckpt best.ckpt] [--cuda]
       (make bench). --smoke: tiny sizes, every figure still produced (the test suite runs it).

  1. extraction_vs_forward   feature extraction img/s (decode + resize + forward + write) / bare encoder forward
                             img/s at the same batch size                                       goal >= 0.9
                             and what bounds it: the images' decode + transform time as a share of the forward's,
                             and the ratio if that were all extraction added (extraction_ceiling)
  2. cached_speedup          a dino_lstm_init training step on cached features vs the same step running the
                             encoder on the batch's images first, one per caption (the tutorial
                             repos' way; also reported: each distinct image once); both under
                             the precision training uses (trainer.precision=auto)              goal >= 30x
                             and what bounds it: the share of the cached step in the LSTM's own kernels, and
                             the ratio if the step were those kernels alone (cached_speedup_ceiling)
  3. batched_beam_speedup    beam-3 per image on real test images: one image at a time / the whole batch together,
                             each way at its faster precision (fp32 / bf16 autocast; both
                             same-precision ratios are printed too)                          goal >= 10x
  4. rss_ratio_10x           peak RSS of a training epoch over 10x the training images / over 1x
                             (feature rows are read per batch, not loaded)                      goal <= 1.3
  5. captions_per_s          training throughput of each of the five decoders on cached features; and
     demo_sweep_seconds      the wall time of the last `make demo` (read from its sweep_seconds.txt: the sweep
                             itself takes longer than this benchmark)                          goal <= 900 s
  6. on CUDA when a GPU is present: training captions/s (bf16 autocast) and batched vs one-at-a-time beam
     (keys ending in _cuda); skipped cleanly on CPU. --cuda runs just the GPU figures, with
  7. the COCO-scale workload (experiments/training_speed.py: 100k images of synthetic features of the real shapes):
     each variant's captions/s today (batch 64 read from the cache) and fast (resident features, --batch-size,
     compiled), their ratio, the step split and the model FLOPs utilisation           goal >= 10x (attention)
     and feature extraction on the GPU (DINOv2 ViT-S/14, JPEGs of COCO's size) with PIL decoding in workers and
     with the JPEGs decoded on the GPU, each / the bare forward                       goal >= 0.8

Speed ratios are per-step or per-image times over the same work, each the median of 5 rounds that time its two sides
one right after the other (this host's speed drifts within minutes); absolute figures depend on the machine,
printed with it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "experiments")]

import torch  # noqa: E402
from training_speed import sync  # noqa: E402

from captioner.config import variants  # noqa: E402

VARIANTS = variants()
GOALS = {"extraction_vs_forward": (">=", 0.9), "cached_speedup": (">=", 30.0), "batched_beam_speedup": (">=", 10.0),
         "rss_ratio_10x": ("<=", 1.3), "demo_sweep_seconds": ("<=", 900.0)}


def _timed(fn, repeat: int = 1, warm_up: bool = True) -> float:
    """Seconds per call of fn (after one warm-up call unless warm_up=False)."""
    if warm_up:
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


ROUNDS = {"n": 5}  # rounds of paired timings behind each ratio (1 with --smoke)


def _paired(fast, slow) -> tuple[float, float, float]:
    """Seconds of one call of `fast` and of `slow` (medians), and the median of their per-round ratio slow/fast.
    The two are timed alternately, round by round, after one warm-up call each: this host's speed drifts within
    minutes, so a ratio of two timings taken apart would carry that drift."""
    fast()
    slow()
    times = [(_timed(fast, warm_up=False), _timed(slow, warm_up=False)) for _ in range(ROUNDS["n"])]
    f, sl = zip(*times)
    return statistics.median(f), statistics.median(sl), statistics.median(b / a for a, b in times)


EVAL_IMAGES = {"n": 300}  # val/test split sizes: 300 = the default shapes world's, so its caches are reused


def _overrides(root: Path, n_train: int, extra=()) -> list[str]:
    n = EVAL_IMAGES["n"]
    return [f"paths.root_dir={root}", f"data.num_train={n_train}", f"data.num_val={n}", f"data.num_test={n}",
            "features.num_workers=0", "logger=none", *extra]


def _autocast(cfg, device: str = "cpu"):
    """The autocast that training uses for this config on `device` (trainer.precision, `auto` resolved)."""
    from captioner.config import resolve_precision

    precision = resolve_precision(cfg.trainer.precision, "gpu" if device == "cuda" else device)
    return precision, torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def _datamodule(model: str, root: Path, n_train: int, extra=()):
    """The config of `model` on the benchmark's shapes world and its DataModule, set up (caches built if needed)."""
    from captioner.config import compose
    from captioner.training import build_datamodule

    cfg = compose([f"model={model}", *_overrides(root, n_train, extra)])
    dm = build_datamodule(cfg)
    dm.progress = False
    dm.prepare_data()
    dm.setup("fit")
    return cfg, dm


def _datamodule_and_model(model: str, root: Path, n_train: int, extra=()):
    from captioner.training import build_model

    cfg, dm = _datamodule(model, root, n_train, extra)
    return cfg, dm, build_model(cfg, dm)


# -- 1 ---------------------------------------------------------------------------------------------------------
def extraction_vs_forward(root: Path, images: int, batch_size: int) -> dict:
    from captioner.config import resolve_extraction_workers
    from captioner.data.shapes import build_shapes
    from captioner.encoders import EncoderSpec, FrozenEncoder, split_transform
    from captioner.features import extract_features
    from captioner.images import load_image

    records = build_shapes(root / "extract", num_train=images, num_val=1, num_test=1, progress=False).split("train")
    encoder = FrozenEncoder(EncoderSpec(name="efficientnet_lite0", weights="package"))
    x = torch.randn(batch_size, 3, 224, 224)
    workers = resolve_extraction_workers("auto", "cpu")  # the default, features.num_workers=auto
    caches = itertools.count()

    def forward_all():  # the bare forward over as many images as are extracted
        with torch.inference_mode():
            for _ in range(-(-images // batch_size)):
                encoder(x)

    def extract_all():  # a new cache every time: the whole extraction, files and all
        extract_features(encoder, records, root / f"extract-cache-{next(caches)}", "bench", "train",
                         batch_size=batch_size, num_workers=workers, progress=False)

    # What bounds it: with no decode workers (the default on 2 cores, see features.num_workers) every image's decode +
    # crop + uint8 conversion, and each batch's normalisation, runs between forwards. With D that work and F the
    # forward per image the ratio is at most F / (F + D).
    image_stage, batch_stage = split_transform(encoder.transform())

    def prepare_all():
        for i in range(0, images, batch_size):
            batch = torch.stack([image_stage(load_image(r.image)) for r in records[i:i + batch_size]])
            if batch_stage is not None:
                batch_stage(batch)

    forward_s, extract_s, ratio = _paired(forward_all, extract_all)
    _, _, prepare_over_forward = _paired(forward_all, prepare_all)
    return {"forward_img_s": images / forward_s, "extraction_img_s": images / extract_s, "extraction_workers": workers,
            "extraction_vs_forward": 1 / ratio, "extraction_prepare_share": prepare_over_forward,
            "extraction_ceiling": 1 / (1 + prepare_over_forward)}


def coco_sized_jpegs(folder: Path, images: int, distinct: int = 64) -> list:
    """`images` JPEGs of COCO's typical size (640x480, quality 90; `distinct` different pictures, repeated) as
    caption records."""
    import io

    import numpy as np
    from PIL import Image

    from captioner.data.records import CaptionRecord

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    encoded = []
    for i in range(distinct):  # smooth colour fields with noise: photo-like JPEG sizes (~100 KB)
        base = np.stack([(x * (i + 1) // 7 + y // 3) % 256, (y * (i + 2) // 5) % 256, (x + y + 9 * i) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    records = []
    for i in range(images):
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(encoded[i % distinct])
        records.append(CaptionRecord(image=path, captions=["a picture"], split="train"))
    return records


def extraction_on_device(root: Path, images: int, batch_size: int, device: str = "cuda") -> dict:
    """Feature extraction on the GPU over the bare forward at the same batch size: DINOv2 ViT-S/14 (random weights,
    `encoder.weights=none`: the speed does not depend on them) on COCO-sized JPEGs, the images decoded by PIL in
    `features.num_workers=auto` workers, and decoded on the GPU (`features.decode=device`)."""
    from captioner.config import resolve_extraction_workers
    from captioner.encoders import EncoderSpec, FrozenEncoder
    from captioner.features import extract_features

    records = coco_sized_jpegs(root / "coco-jpegs", images)
    encoder = FrozenEncoder(EncoderSpec(name="dinov2_vits14", weights="none")).to(device)
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    workers = resolve_extraction_workers("auto", device)
    caches = itertools.count()

    def forward_all():
        with torch.inference_mode():
            for _ in range(-(-images // batch_size)):
                encoder(x)
        sync(device)

    def extract_all(decode: str):
        def run():
            extract_features(encoder, records, root / f"gpu-cache-{next(caches)}", "bench", "train", spatial=True,
                             batch_size=batch_size, num_workers=workers, progress=False, device=device,
                             decode=decode)
            sync(device)
        return run

    out = {"extraction_cuda_encoder": "dinov2_vits14", "extraction_cuda_batch": batch_size,
           "extraction_cuda_workers": workers}
    for decode in ("pil", "device"):
        forward_s, extract_s, ratio = _paired(forward_all, extract_all(decode))
        out.update({"forward_img_s_cuda": images / forward_s, f"extraction_{decode}_img_s_cuda": images / extract_s,
                    f"extraction_{decode}_vs_forward_cuda": 1 / ratio})
    return out


# -- 2 ---------------------------------------------------------------------------------------------------------
ENCODER_STEPS = 8  # batches timed (with the encoder in the loop each step costs about a second on CPU)


def cached_speedup(root: Path, n_train: int, steps: int) -> dict:
    """Per training step: cached features vs loading + transforming + encoding the batch's images first."""
    from captioner.encoders import FrozenEncoder
    from captioner.images import load_image

    import hydra

    cfg, dm, model = _datamodule_and_model("dino_lstm_init", root, n_train)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(params=model.parameters())
    precision, autocast = _autocast(cfg)
    # the same batches on both sides: with loader.group_by_length their lengths, and so their step times, differ
    batches = [b for _, b in zip(range(min(steps, ENCODER_STEPS)), dm.train_dataloader())]
    records = dm.records["train"]
    row_to_record = {int(r): rec for r, rec in zip(dm._rows("train"), records)}
    encoder = FrozenEncoder(dm.encoder_spec)
    transform = encoder.transform()
    model.train()

    def train_step(features, batch):
        with autocast:
            loss = model.caption_loss(features, batch["captions"], batch["caption_image"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def cached_epoch():
        for b in batches:
            train_step(b["features"], b)

    def encoder_epoch(per_caption: bool):
        for b in batches:
            # the batch's images decoded, transformed and encoded now. The tutorial repos' way (per_caption): their
            # dataset yields (image, caption) pairs, so every caption's image goes through the encoder; the
            # friendlier variant encodes each distinct image of the batch once.
            rows = b["image_rows"][b["caption_image"]] if per_caption else b["image_rows"]
            images = [load_image(row_to_record[int(r)].image) for r in rows]
            with torch.no_grad(), autocast:
                pooled, _ = encoder(torch.stack([transform(im) for im in images]))
            train_step(pooled, {**b, "caption_image": None} if per_caption else b)  # features: one row a caption

    def cached_epochs():  # 3 passes: a cached pass is short, and timing noise is not
        for _ in range(3):
            cached_epoch()

    # What bounds the ratio: the LSTM's own kernels (oneDNN's on CPU), forward + backward on inputs of each batch's
    # shape, with the initial state and the inputs requiring gradients as in training. Everything else in the step
    # (embedding, projections, head, loss, AdamW) could at best take no time.
    rnn = model.decoder.rnn
    recurrent_inputs = [(torch.randn(len(b["captions"]), b["captions"].shape[1] - 1, rnn.input_size, requires_grad=True),
                         tuple(torch.randn(rnn.num_layers, len(b["captions"]), rnn.hidden_size, requires_grad=True)
                               for _ in range(2))) for b in batches]

    def recurrent_epochs():
        for _ in range(3):
            for x, hx in recurrent_inputs:
                with autocast:
                    out, _ = rnn(x, hx)
                out.float().sum().backward()

    n = len(batches)
    cached, per_caption, ratio = _paired(cached_epochs, lambda: encoder_epoch(True))
    _, per_image, ratio_d = _paired(cached_epochs, lambda: encoder_epoch(False))
    recurrent, cached_beside, step_over_recurrent = _paired(recurrent_epochs, cached_epochs)
    share = 1 / step_over_recurrent
    # The ratio if the cached step S were its LSTM kernels alone (share * S), the encoder's cost E unchanged: the
    # ratio is R = (E + S) / S, so E / S = R - 1 and the ceiling is E / (share * S) + 1. From ratios only: the
    # absolute times of separate pairings differ with the host's drift.
    ceiling = (3 * ratio - 1) / share + 1
    return {"precision": precision, "cached_step_s": cached / (3 * n), "encoder_step_s": per_caption / n,
            "cached_speedup": 3 * ratio, "encoder_distinct_images_step_s": per_image / n,
            "cached_speedup_distinct_images": 3 * ratio_d, "steps_per_epoch": len(dm.train_dataloader()),
            "cached_step_recurrent_s": recurrent / (3 * n), "cached_step_beside_recurrent_s": cached_beside / (3 * n),
            "cached_step_recurrent_share": share, "cached_speedup_ceiling": ceiling}


# -- 3 ---------------------------------------------------------------------------------------------------------
def batched_beam(ckpt: str | None, root: Path, n_images: int, n_train: int, device: str = "cpu") -> dict:
    """Beam-3 on one checkpoint: all images in one batch vs one image at a time, in fp32 and under bf16 autocast
    (each ratio within one precision). Keys get a `_cuda` suffix on CUDA."""
    from captioner.decoding import beam_search

    if ckpt:
        from captioner.checkpoint import load_captioner

        model = load_captioner(ckpt)
        dim, grid = model.hparams.feature_dim, tuple(model.hparams.grid)
        source = ckpt
    else:  # an untrained attention captioner: decodes to max_len, the slowest case for both ways
        _, dm, model = _datamodule_and_model("dino_attention", root, 40)
        dim, grid = dm.feature_dim, dm.grid
        source = "untrained dino_attention (no checkpoint given)"
    model.to(device).eval()
    shape = (n_images, grid[0] * grid[1], dim) if model.decoder.feature == "spatial" else (n_images, dim)
    feats, feats_source = _test_features(root, n_train, model.decoder.feature, shape)
    feats = feats.to(device)
    kw = dict(beam_size=3, max_len=20, sos_id=model.vocab.sos_id, eos_id=model.vocab.eos_id,
              pad_id=model.vocab.pad_id)

    out, captions = {"beam_checkpoint": source, "beam_features": feats_source}, {}
    ways = {"batched": lambda: beam_search(model.decoder, feats, **kw),
            "single": lambda: [beam_search(model.decoder, feats[i:i + 1], **kw)[0] for i in range(n_images)]}

    def decode(way: str, precision: str):
        def call():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                captions[way] = ways[way]()
            sync(device)  # a call is over when the device is done
        return call

    for precision in ("fp32", "bf16"):
        batched_s, single_s, ratio = _paired(decode("batched", precision), decode("single", precision))
        tag = f"_{precision}"
        out.update({f"beam3{tag}_batched_ms_per_image": 1e3 * batched_s / n_images,
                    f"beam3{tag}_single_ms_per_image": 1e3 * single_s / n_images, f"batched{tag}_beam_speedup": ratio})
        if precision == "fp32":  # bf16 rounding depends on the batch's shape, so only fp32 captions must agree
            out["beam_same_captions"] = captions["batched"] == captions["single"]
    # The headline: each way at its faster precision (batched decoding gains from bf16's AMX matmuls; the one-image
    # loop is bound by per-op overhead, which autocast adds to), timed as a pair of its own: the ratio of two
    # medians from different pairs would carry the host's drift between them.
    best = {way: min(("fp32", "bf16"), key=lambda p: out[f"beam3_{p}_{way}_ms_per_image"])
            for way in ("batched", "single")}
    batched_s, single_s, ratio = _paired(decode("batched", best["batched"]), decode("single", best["single"]))
    out.update({"beam3_batched_precision": best["batched"], "beam3_single_precision": best["single"],
                "beam3_batched_ms_per_image": 1e3 * batched_s / n_images,
                "beam3_single_ms_per_image": 1e3 * single_s / n_images, "batched_beam_speedup": ratio})
    return out if device == "cpu" else {f"{k}_cuda": v for k, v in out.items()}


def _test_features(root: Path, n_train: int, feature: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """The first test images' features of the default dataset (the shapes world with EfficientNet-Lite0, which
    `make demo` trains on) when their shape fits the checkpoint, else random post-activation-like ones. Real images
    matter: how long captions run, and so how many steps each image takes, depends on the input (on random
    features one checkpoint ran most captions to max_len, another stopped early)."""
    try:
        _, dm = _datamodule("dino_attention" if feature == "spatial" else "dino_lstm_init", root, n_train)
        test = dm.splits["test"]
        if len(test) >= shape[0]:
            feats = test.features(test.rows[: shape[0]])
            if tuple(feats.shape) == shape:
                return feats, f"the first {shape[0]} test images of {dm.data_cfg['name']}"
    except Exception as e:  # noqa: BLE001 - any failure means: no matching cache, use random features
        print(f"(beam search on random features: {e})", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).abs(), "random"


# -- 4 ---------------------------------------------------------------------------------------------------------
_RSS_CHILD = r"""
import json, sys
def peak_kib():
    # VmHWM: this process's own peak RSS. Not getrusage's ru_maxrss: on Linux that keeps the high-water mark of the
    # forked parent across exec, so every child would report the (large) benchmark process's peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
sys.path.insert(0, sys.argv[1])
from captioner.memory import keep_freed_memory
keep_freed_memory()  # as training does
from captioner.config import compose
from captioner.training import build_datamodule, build_model
import torch
cfg = compose(["model=" + sys.argv[2], "paths.root_dir=" + sys.argv[3], "data.num_train=" + sys.argv[4],
               "data.num_val=" + sys.argv[5], "data.num_test=" + sys.argv[5], "features.num_workers=0", "logger=none"])
dm = build_datamodule(cfg); dm.progress = False; dm.prepare_data(); dm.setup("fit")
model = build_model(cfg, dm)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
base = peak_kib()
for b in dm.train_dataloader():  # one full epoch
    loss = model.caption_loss(b["features"], b["captions"], b["caption_image"])
    opt.zero_grad(); loss.backward(); opt.step()
print(json.dumps({"peak_kib": peak_kib(), "before_epoch_kib": base}))
"""


def rss_ratio(root: Path, n_train: int, model: str) -> dict:
    """Peak RSS of one training epoch over n and 10n training images, each in a fresh process."""
    out = {}
    for label, n in (("1x", n_train), ("10x", 10 * n_train)):
        # build the dataset and its cache first, in this process: the child measures training only
        _datamodule_and_model(model, root, n)
        r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(REPO), model, str(root), str(n),
                            str(EVAL_IMAGES["n"])],
                           capture_output=True, text=True, check=True)
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return {"rss_model": model, "rss_1x_mib": out["1x"]["peak_kib"] / 1024, "rss_10x_mib": out["10x"]["peak_kib"] / 1024,
            "rss_train_images_1x": n_train, "rss_ratio_10x": out["10x"]["peak_kib"] / out["1x"]["peak_kib"]}


# -- 5 / 6 -----------------------------------------------------------------------------------------------------
def throughput(root: Path, n_train: int, steps: int, device: str) -> dict:
    """Training captions/s of each variant's decoder on cached features, in the precision training uses."""
    import hydra

    out = {}
    for name in VARIANTS:
        cfg, dm, model = _datamodule_and_model(name, root, n_train)
        model.to(device).train()
        optimizer = hydra.utils.instantiate(cfg.optimizer)(params=model.parameters())
        batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
                   for _, b in zip(range(steps), dm.train_dataloader())]
        _, autocast = _autocast(cfg, device)

        def epoch():
            for b in batches:
                with autocast:
                    loss = model.caption_loss(b["features"], b["captions"], b["caption_image"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            sync(device)

        seconds = _timed(epoch, 1)
        out[name] = sum(len(b["captions"]) for b in batches) / seconds
    return out


def demo_sweep_seconds() -> dict:
    found = sorted(REPO.glob("multirun/demo-*/sweep_seconds.txt"), key=lambda p: p.stat().st_mtime)
    if not found:
        return {"demo_sweep_seconds": None, "demo_sweep": "no `make demo` run found under multirun/"}
    text = found[-1].read_text()
    return {"demo_sweep_seconds": float(text.split(":")[1].split()[0]), "demo_sweep": str(found[-1].parent.name)}


def _verdict(key: str, value) -> str:
    if key not in GOALS or value is None:
        return ""
    op, goal = GOALS[key]
    ok = value >= goal if op == ">=" else value <= goal
    return f"goal {op} {goal:g}: {'met' if ok else 'MISSED'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmark.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); every figure is still produced")
    ap.add_argument("--ckpt", help="checkpoint for the beam-search figure (default: newest dino_attention best "
                                   "checkpoint under multirun/, else an untrained model)")
    ap.add_argument("--root", help="where datasets and caches are built (default: a temp dir; the full run "
                                   "reuses ./data for the 3000-image shapes world)")
    ap.add_argument("--cuda", "--cuda-only", dest="cuda_only", action="store_true",
                    help="only the GPU figures: the COCO-scale training workload, extraction on the GPU, batched beam")
    ap.add_argument("--images", type=int, default=100_000, help="--cuda: images of the synthetic COCO-scale workload")
    ap.add_argument("--batch-size", type=int, default=1024, help="--cuda: the fast path's batch (captions)")
    ap.add_argument("--no-compile", action="store_true", help="--cuda: the fast path without torch.compile")
    args = ap.parse_args(argv)
    from captioner.memory import keep_freed_memory

    keep_freed_memory()  # as training does (train() calls it): both sides of every ratio run with it
    smoke = args.smoke
    EVAL_IMAGES["n"] = 4 if smoke else 300
    ROUNDS["n"] = 1 if smoke else 5
    size = dict(extract=16 if smoke else 400, n_train=20 if smoke else 300, steps=3 if smoke else 30,
                beam=4 if smoke else 100)
    tmp = tempfile.TemporaryDirectory(prefix="captioner-bench-")
    root = Path(args.root) if args.root else (Path(tmp.name) if smoke else REPO)
    ckpt = args.ckpt
    if ckpt is None and not smoke:
        found = sorted(REPO.glob("multirun/*/*model-dino_attention*/checkpoints/best-*.ckpt"),
                       key=lambda p: p.stat().st_mtime)
        ckpt = str(found[-1]) if found else None
    cuda = torch.cuda.is_available()
    if args.cuda_only and not cuda:
        ap.error("--cuda: no CUDA device here")

    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else
                     f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "smoke": smoke}
    t_start = time.perf_counter()
    if not args.cuda_only:
        results.update(extraction_vs_forward(Path(tmp.name), size["extract"], 8))
        results.update(cached_speedup(root, size["n_train"], size["steps"]))
        results.update(batched_beam(ckpt, root, size["beam"], size["n_train"]))
        results.update(rss_ratio(root, size["n_train"], "dino_attention"))
        results["captions_per_s"] = throughput(root, size["n_train"], size["steps"], "cpu")
        results.update(demo_sweep_seconds())
    results["captions_per_s_cuda"] = throughput(root, size["n_train"], size["steps"], "cuda") if cuda else None
    if cuda:
        results.update(batched_beam(ckpt, root, size["beam"], size["n_train"], "cuda"))
    if args.cuda_only:
        from training_speed import measure

        results["coco_scale_training"] = measure(VARIANTS, 2_000 if smoke else args.images, args.batch_size,
                                                 not args.no_compile, 10 if smoke else 60, "cuda")
        results.update(extraction_on_device(Path(tmp.name), 256 if smoke else 2_000, 64))
    results["benchmark_seconds"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(results, indent=2))
    tmp.cleanup()

    print(f"device: {results['device']}, torch {results['torch']}, {results['threads']} threads"
          f"{' (smoke sizes)' if smoke else ''}")
    if not args.cuda_only:
        _print_cpu_rows(results)
    if cuda:
        print("  training captions/s (cuda, bf16): " + ", ".join(
            f"{k} {v:.0f}" for k, v in results["captions_per_s_cuda"].items()))
        r = {k[:-len("_cuda")]: v for k, v in results.items() if k.endswith("_cuda")}
        print(f"  beam-3 batched vs one at a time (cuda): {r['batched_beam_speedup']:.1f}x (fp32 "
              f"{r['batched_fp32_beam_speedup']:.1f}x: {r['beam3_fp32_batched_ms_per_image']:.2f} vs "
              f"{r['beam3_fp32_single_ms_per_image']:.2f} ms/image; bf16 {r['batched_bf16_beam_speedup']:.1f}x: "
              f"{r['beam3_bf16_batched_ms_per_image']:.2f} vs {r['beam3_bf16_single_ms_per_image']:.2f} ms/image)")
        if "coco_scale_training" in results:
            from training_speed import render_row

            w = results["coco_scale_training"]
            print(f"  COCO-scale training ({w['images']:,} images, batch 64 read from the cache -> resident, batch "
                  f"{w['batch_size']}{', compiled' if w['compile'] else ''}):")
            for name, row in w["variants"].items():
                print(render_row(name, row))
            print(f"  extraction on the GPU / bare forward ({results['extraction_cuda_encoder']}, batch "
                  f"{results['extraction_cuda_batch']}): PIL in {results['extraction_cuda_workers']} workers "
                  f"{results['extraction_pil_vs_forward_cuda']:.2f} ({results['extraction_pil_img_s_cuda']:.0f} img/s), "
                  f"JPEGs decoded on the GPU {results['extraction_device_vs_forward_cuda']:.2f} "
                  f"({results['extraction_device_img_s_cuda']:.0f} img/s); bare forward "
                  f"{results['forward_img_s_cuda']:.0f} img/s   goal >= 0.8")
    else:
        print("  CUDA: no GPU here, skipped")
    print(f"benchmark took {results['benchmark_seconds']:.0f} s -> {args.out}")
    return 0


def _print_cpu_rows(results: dict) -> None:
    rows = [
        ("extraction / bare forward", "extraction_vs_forward",
         f"{results['extraction_img_s']:.1f} vs {results['forward_img_s']:.1f} img/s "
         f"({results['extraction_workers']} decode workers: features.num_workers=auto)"),
        ("  bound: decode between forwards", "extraction_ceiling",
         f"the ratio if extraction were the forward plus its images' decode + crop + normalisation "
         f"({100 * results['extraction_prepare_share']:.1f} % of the forward's time), nothing overlapped"),
        ("cached step vs encoder every step", "cached_speedup",
         f"{1e3 * results['cached_step_s']:.1f} vs {1e3 * results['encoder_step_s']:.1f} ms/step "
         f"({results['precision']}; each caption's image; each distinct image once: "
         f"{1e3 * results['encoder_distinct_images_step_s']:.1f} ms, {results['cached_speedup_distinct_images']:.1f}x)"),
        ("  bound: LSTM kernels alone", "cached_speedup_ceiling",
         f"the ratio if the cached step were only its LSTM's forward + backward "
         f"({100 * results['cached_step_recurrent_share']:.0f} % of it: "
         f"{1e3 * results['cached_step_recurrent_s']:.1f} of {1e3 * results['cached_step_beside_recurrent_s']:.1f} "
         f"ms/step)"),
        ("beam-3 batched vs one at a time", "batched_beam_speedup",
         f"{results['beam3_batched_ms_per_image']:.1f} {results['beam3_batched_precision']} vs "
         f"{results['beam3_single_ms_per_image']:.1f} {results['beam3_single_precision']} ms/image (each "
         f"at its faster precision; fp32 both: {results['beam3_fp32_batched_ms_per_image']:.1f} vs "
         f"{results['beam3_fp32_single_ms_per_image']:.1f} ms, {results['batched_fp32_beam_speedup']:.1f}x; bf16 both: "
         f"{results['beam3_bf16_batched_ms_per_image']:.1f} vs {results['beam3_bf16_single_ms_per_image']:.1f} ms, "
         f"{results['batched_bf16_beam_speedup']:.1f}x)"),
        ("peak RSS 10x / 1x training images", "rss_ratio_10x",
         f"{results['rss_10x_mib']:.0f} vs {results['rss_1x_mib']:.0f} MiB ({results['rss_model']})"),
        ("make demo wall time (s)", "demo_sweep_seconds", results.get("demo_sweep", "")),
    ]
    for label, key, detail in rows:
        value = results[key]
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"  {label:<36} {shown:>8}   {_verdict(key, value):<22} {detail}")
    print(f"  training captions/s (cpu, {results['precision']}): "
          + ", ".join(f"{k} {v:.0f}" for k, v in results["captions_per_s"].items()))


if __name__ == "__main__":
    sys.exit(main())
