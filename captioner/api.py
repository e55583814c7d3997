"""The Python API: a trained captioner with its own frozen encoder, images in, captions out.

    from captioner import Captioner
    model = Captioner.from_pretrained("exported_dir")         # or a .ckpt, or a Hub repo id when online
    model.caption("photo.jpg")                                 # -> str
    model.caption(["a.jpg", pil_image, np_array], beam_size=3) # -> list[str], batched
    model.caption("photo.jpg", return_attention=True)          # -> {"caption", "words", "attention"}

Images may be paths, PIL images, numpy arrays (H, W), (H, W, 3|4) uint8 or float in [0, 1], or tensors
(3, H, W) / (H, W, 3). Every image goes through `captioner.images` (the reader feature extraction uses) and the
encoder's own transform, and the features are rounded through fp16 as the training cache stores them, so a caption
here is the one `eval.py` and `captioner-caption` give for the same image and settings. An image that cannot be
read raises `ImageReadError` naming it (its position in the list, and the file); `errors="return"` puts the error
in that image's place instead and captions the rest.

The class follows huggingface_hub's `ModelHubMixin`: `save_pretrained(dir)` writes the self-contained model
directory of captioner.export, and `push_to_hub(repo_id)` uploads it for users who are online.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from huggingface_hub import ModelHubMixin
from PIL import Image

from .errors import UserError
from .images import MAX_PIXELS, ImageReadError, load_image, to_rgb

# Decode settings `caption(...)` takes by keyword, beside beam_size and max_len (see conf/train.yaml `decode:`).
DECODE_OPTIONS = ("min_len", "length_penalty", "suppress_unk", "block_trigrams", "sample", "temperature", "top_k")


class Captioner(ModelHubMixin, library_name="captioner", tags=["image-captioning"]):
    """A trained captioner: `model` (the LightningModule, eval mode) and its frozen `encoder`, on `device`."""

    def __init__(self, model, encoder, device: str = "cpu") -> None:
        self.model, self.encoder = model, encoder
        self.device = torch.device(device)
        self.transform = encoder.transform()
        self.spatial = model.decoder.feature == "spatial"

    # -- loading and saving -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "auto", encoder_weights: str | Path | None = None,
                        weights_option: str = "encoder_weights=/path/to/file", **hub_kwargs) -> "Captioner":
        """A model directory (captioner-export), a training checkpoint (.ckpt), or, for users who are online, a
        Hub repo id holding a model directory. `encoder_weights`: a checkpoint's encoder weights file, where it
        is not at the path the checkpoint records (its SHA-256 must match; `weights_option` is how an error names
        that setting). `device`: auto | cpu | cuda | cuda:N."""
        from .caption import device_problem
        from .checkpoint import build_captioner, check_features_match, load_captioner
        from .config import resolve_device
        from .encoders import EncoderSpec, FrozenEncoder, relocate_weights
        from .export import is_model_dir, read_model_dir

        problem = device_problem(device)
        if problem:
            raise UserError(f"device {problem}")
        dev = torch.device(resolve_device(device))
        local = Path(str(path)).expanduser()
        if local.is_file():
            model = load_captioner(local, dev)
            spec = relocate_weights(EncoderSpec.from_checkpoint(model.hparams.encoder), encoder_weights,
                                    weights_option, local)
        else:
            if not is_model_dir(local):
                local = _download(str(path), local, hub_kwargs)
            hp, state, _ = read_model_dir(local)
            model = build_captioner(hp, state, local, dev)
            spec = EncoderSpec.from_checkpoint(hp["encoder"])
        encoder = FrozenEncoder(spec).to(dev)
        check_features_match(model, encoder.dim, encoder.grid, f"its encoder {spec.name}", local)
        return cls(model, encoder, str(dev))

    def _save_pretrained(self, save_directory: Path) -> None:
        from .export import write_model_dir

        write_model_dir(self.model, self.encoder, save_directory)

    # -- captioning ---------------------------------------------------------------------------------------------
    def caption(self, images: Any, *, beam_size: int | None = None, max_len: int | None = None,
                return_attention: bool = False, batch_size: int = 16, errors: str = "raise", **decode):
        """The caption of one image (a str; a dict with `return_attention`), or of each image of a list (a list).
        Other decode settings by keyword: min_len, length_penalty, suppress_unk, block_trigrams, sample,
        temperature, top_k (sample draws each word: call again for other captions)."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        settings = self.decode_settings(beam_size=beam_size, max_len=max_len, **decode)
        results: list[Any] = [None] * len(items)
        for start in range(0, len(items), batch_size):
            chunk, at = [], []
            for i in range(start, min(start + batch_size, len(items))):
                try:
                    chunk.append(as_pil(items[i], i if not single else None))
                    at.append(i)
                except ImageReadError as e:
                    if errors == "raise":
                        raise
                    results[i] = e
            if chunk:
                for i, r in zip(at, self.caption_images(chunk, return_attention, settings)):
                    results[i] = r if return_attention else r["caption"]
        return results[0] if single else results

    def decode_settings(self, flags: bool = False, **asked) -> dict:
        """The model's decode settings with `asked` on top (None: the model's), checked against what this
        decoder can do; a value that cannot work is a UserError naming it (`flags`: as the command-line flag,
        --top-k rather than top_k)."""
        from .checkpoint import MAX_BEAM, caption_length_limit
        from .schema import Decode, check_section

        unknown = [k for k in asked if k not in ("beam_size", "max_len", *DECODE_OPTIONS)]
        if unknown:
            raise TypeError(f"caption() got unknown decode settings {unknown}; allowed: beam_size, max_len, "
                            f"{', '.join(DECODE_OPTIONS)}")
        asked = {k: v for k, v in asked.items() if v is not None}
        if asked.get("sample") and "beam_size" not in asked:
            asked["beam_size"] = 1  # sampling replaces the model's default search
        settings = {**self.model.decode_cfg, **asked}
        prefix = "--" if flags else ""
        problems = check_section(settings, Decode, prefix, closed=False)
        limit = caption_length_limit(self.model.hparams.decoder)
        for key, high in (("beam_size", MAX_BEAM), ("max_len", limit)):
            if not problems and settings[key] > high:  # the flag as typed: --max-len 100
                shown = f"--{key} {settings[key]}" if flags else f"{key}={settings[key]}"
                problems.append(f"{shown}: allowed is an integer in [1, {high}] for this model")
        if problems:
            raise UserError("; ".join(p.replace("_", "-") if flags else p for p in problems))
        return settings

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.transform(im) for im in images]).to(self.device)
        pooled, spatial = self.encoder(batch)
        # Training read features from the fp16 cache: round the same way, so inference sees what training saw.
        return (spatial if self.spatial else pooled).half().float()

    def caption_images(self, images: Sequence[Image.Image], attention: bool = False,
                       settings: dict | None = None) -> list[dict]:
        """[{"caption": str, "words": [...], "attention": (n_words, h, w) array or None}] per RGB image."""
        feats = self.features(images)
        captions = self.model.generate(feats, **(settings or {}))
        words = [c.split() for c in captions]
        maps = self.model.attention_maps(feats, words) if attention and self.spatial else [None] * len(images)
        return [{"caption": c, "words": w, "attention": m} for c, w, m in zip(captions, words, maps)]


def _download(repo_id: str, local: Path, hub_kwargs: dict) -> Path:
    """A Hub repo's model directory (users who are online); a local path that does not exist is said so."""
    looks_local = local.is_absolute() or str(repo_id).startswith((".", "~")) or str(repo_id).count("/") > 1 \
        or local.suffix == ".ckpt"
    if looks_local or local.exists():
        raise UserError(f"{repo_id}: checkpoint not found, and no model directory there (captioner-export writes "
                        "one, holding config.json)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, **hub_kwargs))
    except Exception as e:  # offline, no such repo, no permission: all mean "not loadable from the Hub"
        raise UserError(f"{repo_id}: not a local checkpoint or model directory, and not downloadable from the "
                        f"Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")


def as_pil(image: Any, position: int | None = None) -> Image.Image:
    """Any supported image as an RGB PIL image; ImageReadError naming it (and its place in the list) otherwise."""
    where = f"image {position}" if position is not None else "the image"
    if isinstance(image, (str, Path)):
        return load_image(image)  # its errors name the file
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = image.numpy()
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, where)
    raise ImageReadError(f"{where}: a {type(image).__name__} is not an image; give a path, a PIL image, a numpy "
                         "array (H, W[, 3|4]) or a tensor (3, H, W)")


def _array_to_pil(a: np.ndarray, where: str) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise ImageReadError(f"{where}: an array of shape {a.shape} is not an image; allowed are (H, W), (H, W, 3) "
                             "and (H, W, 4)")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ImageReadError(f"{where}: {a.shape[1]}x{a.shape[0]} pixels is over the {MAX_PIXELS:,}-pixel limit "
                             "(captioner.images.MAX_PIXELS); downscale it")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise ImageReadError(f"{where}: an array of {a.dtype} is not an image; use uint8 or floats in [0, 1]")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageReadError(f"{where}: the array holds NaN or infinite values")
        if a.min() >= 0 and a.max() <= 1:
            a = a * 255
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(a))
