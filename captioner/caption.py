"""Caption your own images with a trained checkpoint.

usage: python -m captioner.caption --ckpt PATH IMAGE_OR_DIR [...] [--beam-size 3] [--json]
                                   [--attention-maps DIR] [--device auto|cpu|cuda] [--batch-size 16]
                                   [--encoder-weights FILE]
       (also installed as `captioner-caption`)

Prints `file<TAB>caption` per image (or one JSON object per line with --json). Directories are walked for image
files (.jpg .jpeg .png .webp .bmp .gif .tif .tiff); files named on the command line are always tried. A file
that cannot be read (corrupt, truncated, empty, not an image) is reported on stderr and skipped; the others are
still captioned. Exit status: 0 when every image was captioned, 1 when some were skipped, 2 when none could be.

The checkpoint brings everything: its vocabulary, and the encoder, weights source and transform (`resize` mode
included) it was trained on; the encoder runs on the fly (no feature cache). A checkpoint trained with a local
weights file records the file's path and SHA-256: where the file lives elsewhere, `--encoder-weights FILE` gives
its location, and a file with other contents is refused. For the attention variant, `--attention-maps DIR` writes
one PNG per image: the image and the cross-attention heat-map behind each generated word.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import CheckpointError, load_captioner
from .config import resolve_device
from .encoders import EncoderSpec, EncoderWeightsError, FrozenEncoder, relocate_weights
from .images import ImageReadError, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageCaptioner:
    """A checkpoint's captioner with its own frozen encoder: PIL images in, captions out."""

    def __init__(self, ckpt_path: str | Path, device: str = "auto", beam_size: int | None = None,
                 max_len: int | None = None, encoder_weights: str | Path | None = None) -> None:
        """`encoder_weights`: where the checkpoint's encoder weights file is on this machine, when not where
        training read it (its SHA-256 must match the recorded one)."""
        self.device = torch.device(resolve_device(device))
        self.model = load_captioner(ckpt_path, self.device)
        self.spec = relocate_weights(EncoderSpec.from_checkpoint(self.model.hparams.encoder), encoder_weights,
                                     "--encoder-weights /path/to/file", ckpt_path)
        self.encoder = FrozenEncoder(self.spec).to(self.device)
        self.transform = self.encoder.transform()
        self.spatial = self.model.decoder.feature == "spatial"
        if self.encoder.dim != self.model.hparams.feature_dim or (
                self.spatial and tuple(self.encoder.grid) != tuple(self.model.hparams.grid)):
            raise CheckpointError(
                f"{ckpt_path}: the decoder expects {self.model.hparams.feature_dim}-d features on a "
                f"{tuple(self.model.hparams.grid)} grid, but encoder {self.spec.name} gives {self.encoder.dim}-d on "
                f"{tuple(self.encoder.grid)}: the checkpoint's encoder settings do not reproduce its training")
        overrides = {k: v for k, v in (("beam_size", beam_size), ("max_len", max_len)) if v is not None}
        self.model.decode_cfg.update(overrides)

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.transform(im) for im in images]).to(self.device)
        pooled, spatial = self.encoder(batch)
        # Training read features from the fp16 cache: round the same way, so inference sees what training saw.
        return (spatial if self.spatial else pooled).half().float()

    def caption(self, images: Sequence[Image.Image], attention: bool = False) -> list[dict]:
        """[{"caption": str, "words": [...], "attention": (n_words, h, w) array or None}] per image."""
        feats = self.features(images)
        captions = self.model.generate(feats)
        words = [c.split() for c in captions]
        maps = self._attention(feats, words) if attention and self.spatial else [None] * len(images)
        return [{"caption": c, "words": w, "attention": m} for c, w, m in zip(captions, words, maps)]

    @torch.no_grad()  # decoding steps under autocast: see captioner.decoding on inference_mode
    def _attention(self, feats: torch.Tensor, words: list[list[str]]) -> list[np.ndarray]:
        """Replay each caption step by step and keep the last layer's cross-attention behind every word
        (whatever search produced the caption, the map is what the decoder looked at for that word)."""
        vocab, decoder = self.model.vocab, self.model.decoder
        n = max((len(w) for w in words), default=0)
        ids = torch.full((len(words), n + 1), vocab.pad_id, dtype=torch.long)
        ids[:, 0] = vocab.sos_id
        for b, w in enumerate(words):
            ids[b, 1:len(w) + 1] = torch.tensor([vocab.stoi.get(t, vocab.unk_id) for t in w], dtype=torch.long)
        ids = ids.to(self.device)
        state = decoder.init_state(feats)
        steps = []
        for t in range(n):
            _, state, att = decoder.step(ids[:, t], state, return_attention=True)
            steps.append(att.float().cpu())
        h, w = self.model.hparams.grid
        grid = torch.stack(steps, dim=1).view(len(words), n, h, w).numpy() if steps else np.zeros((len(words), 0, h, w))
        return [grid[b, :len(wd)] for b, wd in enumerate(words)]


def attention_figure(image: Image.Image, words: Sequence[str], maps: np.ndarray, columns: int = 5) -> Image.Image:
    """The image, then one panel per word with its attention map (bilinearly upsampled) over the image."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = image.convert("RGB").resize((224, 224), Image.BICUBIC)
    panels = len(words) + 1
    cols = min(columns, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(shown)
    axes.flat[0].set_title("image", fontsize=9)
    for k, (word, m) in enumerate(zip(words, maps), start=1):
        heat = Image.fromarray(np.asarray(m, np.float32)).resize(shown.size, Image.BILINEAR)
        ax = axes.flat[k]
        ax.imshow(shown)
        ax.imshow(np.asarray(heat), cmap="jet", alpha=0.5)
        ax.set_title(word, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and directories walked (sorted) for files with an image suffix."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captioner-caption", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files and/or directories (walked)")
    parser.add_argument("--ckpt", required=True, help="a checkpoint from a run's checkpoints/ folder")
    parser.add_argument("--beam-size", type=int, default=None, help="beam width (default: the checkpoint's, 1=greedy)")
    parser.add_argument("--max-len", type=int, default=None, help="maximum caption length in words")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of file<TAB>caption")
    parser.add_argument("--attention-maps", metavar="DIR", help="attention variant: write one PNG per image here")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--encoder-weights", metavar="FILE", default=None,
                        help="the checkpoint's encoder weights file, when it is not at the path recorded in the "
                             "checkpoint (it must have the recorded SHA-256)")
    args = parser.parse_args(argv)

    try:
        captioner = ImageCaptioner(args.ckpt, args.device, args.beam_size, args.max_len,
                                   encoder_weights=args.encoder_weights)
    except (CheckpointError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    maps_dir = Path(args.attention_maps) if args.attention_maps else None
    if maps_dir is not None:
        if not captioner.spatial:
            print("note: --attention-maps needs the attention variant (dino_attention); this checkpoint's decoder "
                  f"({captioner.model.hparams.decoder['name']}) has no spatial attention, no maps written",
                  file=sys.stderr)
            maps_dir = None
        else:
            maps_dir.mkdir(parents=True, exist_ok=True)

    files = find_images(args.paths)
    if not files:
        print(f"error: no image files found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    done = skipped = 0
    used_names: set[str] = set()
    for chunk in _batches(files, args.batch_size):
        images, ok = [], []
        for f in chunk:
            try:
                images.append(load_image(f))
                ok.append(f)
            except ImageReadError as e:
                print(f"skipped {e}", file=sys.stderr)
                skipped += 1
        if not images:
            continue
        for f, im, r in zip(ok, images, captioner.caption(images, attention=maps_dir is not None)):
            record = {"file": str(f), "caption": r["caption"]}
            if maps_dir is not None:
                name = f"{f.stem}.attention.png"
                k = 1
                while name in used_names:  # same file name in two folders: keep both maps
                    name, k = f"{f.stem}_{k}.attention.png", k + 1
                used_names.add(name)
                out = maps_dir / name
                attention_figure(im, r["words"], r["attention"]).save(out)
                record["attention_map"] = str(out)
            print(json.dumps(record) if args.json else f"{f}\t{r['caption']}", flush=True)
            done += 1
    if skipped:
        print(f"{done} image(s) captioned, {skipped} skipped (listed above)", file=sys.stderr)
    return 2 if done == 0 else (1 if skipped else 0)


if __name__ == "__main__":
    sys.exit(main())
