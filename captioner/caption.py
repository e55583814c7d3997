"""Caption your own images with a trained checkpoint.

usage: python -m captioner.caption --ckpt PATH IMAGE_OR_DIR [...] [--beam-size 3] [--max-len 30] [--json]
                                   [--block-trigrams] [--sample [--temperature 1.0] [--top-k 0] [--seed N]]
                                   [--attention-maps DIR] [--device auto|cpu|cuda|cuda:N] [--batch-size 16]
                                   [--encoder-weights FILE]
       (also installed as `captioner-caption`)

Prints `file<TAB>caption` per image (or one JSON object per line with --json). Captions are the most probable
ones (greedy, or beam search with --beam-size); --sample draws each word instead (from the model's distribution
sharpened by --temperature below 1, and only among the --top-k most probable words when given): run it again, or
name the image twice, for other captions; --seed makes the draws repeatable. --block-trigrams keeps any caption
from repeating a trigram. Directories are walked for image
files (.jpg .jpeg .png .webp .bmp .gif .tif .tiff); files named on the command line are always tried. A file
that cannot be read (corrupt, truncated, empty, unreadable, not an image), and a directory named on the command
line that holds no image, is reported on stderr and skipped; the others are still captioned. Exit status: 0 when
every image was captioned, 1 when some were skipped, 2 when none could be or the input is bad (a flag's value, the
checkpoint: one line `error: ...` on stderr).

`--ckpt` takes a checkpoint or a model directory written by captioner-export. The checkpoint brings everything: its vocabulary, and the encoder, weights source and transform (`resize` mode
included) it was trained on; the encoder runs on the fly (no feature cache). A checkpoint trained with a local
weights file records the file's path and SHA-256: where the file lives elsewhere, `--encoder-weights FILE` gives
its location, and a file with other contents is refused. For an attention variant, `--attention-maps DIR` writes
one PNG per image: the image and the cross-attention heat-map behind each generated word, as `<stem>.attention.png`
(replacing this command's own earlier map of that name, never writing through a link planted there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import MAX_BEAM
from .errors import UserError, reported_exit_status
from .files import atomic_write_bytes
from .images import ImageReadError, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageCaptioner:
    """The command's captioner: `captioner.Captioner` with the decode flags applied to every caption."""

    def __init__(self, ckpt_path: str | Path, device: str = "auto", beam_size: int | None = None,
                 max_len: int | None = None, encoder_weights: str | Path | None = None,
                 decode: dict | None = None) -> None:
        """`ckpt_path`: a checkpoint or a model directory (captioner-export). `encoder_weights`: where the
        checkpoint's encoder weights file is on this machine, when not where training read it (its SHA-256 must
        match the recorded one). `decode`: other decode settings (`block_trigrams`, `sample`, `temperature`,
        `top_k`)."""
        from .api import Captioner

        problem = device_problem(device)
        if problem:
            raise UserError(f"--device {problem}")
        self.captioner = Captioner.from_pretrained(ckpt_path, device=device, encoder_weights=encoder_weights,
                                                   weights_option="--encoder-weights /path/to/file")
        self.settings = self.captioner.decode_settings(flags=True, beam_size=beam_size, max_len=max_len,
                                                       **(decode or {}))
        self.model, self.encoder, self.device = self.captioner.model, self.captioner.encoder, self.captioner.device
        self.spec, self.transform, self.spatial = self.encoder.spec, self.captioner.transform, self.captioner.spatial

    def caption(self, images: Sequence[Image.Image], attention: bool = False) -> list[dict]:
        """[{"caption": str, "words": [...], "attention": (n_words, h, w) array or None}] per image."""
        return self.captioner.caption_images(images, attention, self.settings)


def device_problem(name: str) -> str | None:
    """Why `name` cannot be the device here (None: it can): auto | cpu | cuda | cuda:N, a GPU only where one is
    visible."""
    if name in ("auto", "cpu"):
        return None
    match = re.fullmatch(r"cuda(?::(\d+))?", str(name))
    if match is None:
        return f"{name!r} is not a device: allowed is auto | cpu | cuda | cuda:N"
    if not torch.cuda.is_available():
        return f"{name}: no CUDA GPU is visible on this machine; allowed here is auto | cpu"
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        return f"{name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
    return None


def attention_figure(image: Image.Image, words: Sequence[str], maps: np.ndarray, columns: int = 5) -> Image.Image:
    """The image, then one panel per word with its attention map (bilinearly upsampled) over the image."""
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


def write_png(image: Image.Image, path: Path) -> None:
    """Write `image` as PNG at `path`, whole or not at all, and never through a link planted there
    (`captioner.files.atomic_write_bytes`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        if isinstance(e, UserError):  # a full disk, already said
            raise
        raise UserError(f"--attention-maps: cannot write {path} ({e.strerror or e}); give a directory you can "
                        "write to") from None


def refuse_file_as_maps_dir(path: Path) -> None:
    """`--attention-maps` names a directory: an existing file there is refused, never replaced."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--attention-maps {path}: an existing file, not a directory; give a directory (it is "
                        "created if missing)")


def make_maps_dir(path: Path) -> None:
    """The `--attention-maps` directory, created if missing."""
    refuse_file_as_maps_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--attention-maps {path}: cannot create that directory ({e.strerror or e}); give a "
                        "directory you can write to") from None


def find_images(paths: Iterable[str | Path], empty: list[Path] | None = None) -> list[Path]:
    """Files as given, and directories walked (sorted) for files with an image suffix; a directory without any is
    added to `empty` (when given)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            out.extend(found)
            if not found and empty is not None:
                empty.append(p)
        else:
            out.append(p)
    return out


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def integer_in(low: int, high: int | None = None):
    """An argparse `type`: an integer in [low, high] (high: None for no bound), else a message saying so."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer: must be {allowed}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value}: must be {allowed}")
        return value

    return parse


def device_argument(text: str) -> str:
    """An argparse `type`: a device this machine has."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captioner-caption", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files and/or directories (walked)")
    parser.add_argument("--ckpt", required=True,
                        help="a checkpoint from a run's checkpoints/ folder, or a model directory (captioner-export)")
    parser.add_argument("--beam-size", type=integer_in(1, MAX_BEAM), default=None,
                        help="beam width (default: the checkpoint's, 1=greedy)")
    parser.add_argument("--max-len", type=integer_in(1), default=None,
                        help="maximum caption length in words (at most what the checkpoint's decoder can produce)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of file<TAB>caption")
    parser.add_argument("--block-trigrams", action="store_true", help="no caption repeats a trigram")
    parser.add_argument("--sample", action="store_true",
                        help="draw each word from the model's distribution instead of taking the most probable")
    parser.add_argument("--temperature", type=float, default=None, help="with --sample: below 1 sharpens (default 1)")
    parser.add_argument("--top-k", type=integer_in(0), default=None,
                        help="with --sample: draw among the k most probable words only (default 0: all)")
    parser.add_argument("--seed", type=integer_in(0), default=None, help="with --sample: repeatable draws")
    parser.add_argument("--attention-maps", metavar="DIR", help="attention variant: write one PNG per image here")
    parser.add_argument("--device", type=device_argument, default="auto",
                        help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=integer_in(1), default=16, help="images per forward pass")
    parser.add_argument("--encoder-weights", metavar="FILE", default=None,
                        help="the checkpoint's encoder weights file, when it is not at the path recorded in the "
                             "checkpoint (it must have the recorded SHA-256)")
    args = parser.parse_args(argv)
    try:
        return caption_files(args)
    except BrokenPipeError:  # `captioner-caption ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1
    except Exception as e:  # a user error is one line and exit status 2; a bug keeps its traceback
        return reported_exit_status(e)


def caption_files(args: argparse.Namespace) -> int:
    """Caption every image of the command line; the exit status (0 all captioned, 1 some skipped, 2 none)."""
    maps_dir = Path(args.attention_maps) if args.attention_maps else None
    if maps_dir is not None:
        refuse_file_as_maps_dir(maps_dir)  # before the checkpoint is loaded: a mistyped path fails at once
    if (args.temperature is not None or args.top_k is not None or args.seed is not None) and not args.sample:
        raise UserError("--temperature, --top-k and --seed only apply with --sample")
    decode = {k: v for k, v in (("block_trigrams", args.block_trigrams or None), ("sample", args.sample or None),
                                ("temperature", args.temperature), ("top_k", args.top_k)) if v is not None}
    if args.seed is not None:
        torch.manual_seed(args.seed)
    captioner = ImageCaptioner(args.ckpt, args.device, args.beam_size, args.max_len,
                               encoder_weights=args.encoder_weights, decode=decode)
    if maps_dir is not None:
        if not captioner.spatial:
            print("note: --attention-maps needs an attention variant (dino_attention, dino_sat); this checkpoint's "
                  f"decoder ({captioner.model.hparams.decoder['_target_']}) has no spatial attention, no maps written",
                  file=sys.stderr)
            maps_dir = None
        else:
            make_maps_dir(maps_dir)

    empty: list[Path] = []
    files = find_images(args.paths, empty)
    if not files:
        raise UserError(f"no image files found in {' '.join(args.paths)} (directories are walked for "
                        f"{' '.join(sorted(IMAGE_SUFFIXES))})")
    for folder in empty:
        print(f"skipped {folder}: a directory with no image files ({' '.join(sorted(IMAGE_SUFFIXES))})",
              file=sys.stderr)
    done, skipped = 0, len(empty)
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
                stem = f.stem[:200]  # the map's name stays within the file-name limit (255 bytes)
                name = f"{stem}.attention.png"
                k = 1
                while name in used_names:  # same file name in two folders: keep both maps
                    name, k = f"{stem}_{k}.attention.png", k + 1
                used_names.add(name)
                out = maps_dir / name
                write_png(attention_figure(im, r["words"], r["attention"]), out)
                record["attention_map"] = str(out)
            print(json.dumps(record) if args.json else f"{f}\t{r['caption']}", flush=True)
            done += 1
    if skipped:
        print(f"{done} image(s) captioned, {skipped} skipped (listed above)", file=sys.stderr)
    return 2 if done == 0 else (1 if skipped else 0)


if __name__ == "__main__":
    sys.exit(main())
