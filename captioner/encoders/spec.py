"""What determines an encoder's output: `EncoderSpec`, and the identity of a weights file (its SHA-256).

A weights file is identified by its SHA-256 (`EncoderSpec.weights_sha256`, recorded in checkpoints and feature-cache
keys), so a checkpoint keeps working when its weights file is moved: see `relocate_weights`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config import CONF_DIR
from ..errors import UserError

log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("hub", "package", "none")  # any other `encoder.weights` is a file path
RESIZE_MODES = ("squash", "crop", "pad")

_SHA256: dict[tuple[str, int, int], str] = {}


class EncoderWeightsError(UserError, RuntimeError):
    """Weights cannot be had or do not fit the encoder; the message says what to do instead."""


@functools.cache
def known_encoders() -> dict[str, str]:
    """name -> timm model name of each conf/encoder/*.yaml: the one list of encoders, so that a spec (or a checkpoint)
    given only a name gets the same timm model as the config option of that name."""
    from omegaconf import OmegaConf

    found = {}
    for path in sorted((CONF_DIR / "encoder").glob("*.yaml")):
        node = OmegaConf.load(path)
        if node.get("name") and node.get("timm_name"):
            found[str(node.name)] = str(node.timm_name)
    return found


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, computed once per process per (path, size, mtime): weights files run to hundreds of MB
    and a spec is built several times per run."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest needs Python 3.11
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that determines an encoder's output, and so everything a feature-cache key or a checkpoint
    must carry to reproduce it at inference time."""

    name: str = "efficientnet_lite0"
    timm_name: str = ""  # empty: the timm model of conf/encoder/<name>.yaml
    weights: str = "package"
    input_size: int = 224
    # Captions describe the whole image: the usual ImageNet centre crop (crop_pct 0.875) would cut off objects
    # near the border, so nothing is cropped by default.
    crop_pct: float = 1.0
    interpolation: str | None = None  # None: the model's own (bicubic for all of ours)
    resize: str = "squash"  # squash | crop | pad: see captioner.encoders.transforms
    # SHA-256 of a weights file: filled from the file when the spec is made, so that a checkpoint can check a
    # moved copy of it and a feature cache outlives a move. Empty for hub / package / none.
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.timm_name:
            known = known_encoders()
            if self.name not in known:
                raise ValueError(
                    f"unknown encoder '{self.name}' (config key encoder.name); known: {', '.join(known)}, "
                    "or set encoder.timm_name to any timm model name"
                )
            object.__setattr__(self, "timm_name", known[self.name])
        object.__setattr__(self, "weights", str(self.weights))  # a Path would not load from a weights_only checkpoint
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"encoder.resize={self.resize!r}: expected one of {' | '.join(RESIZE_MODES)}")
        if self.weights_file and not self.weights_sha256 and Path(str(self.weights)).expanduser().is_file():
            object.__setattr__(self, "weights_sha256", file_sha256(str(self.weights)))

    @classmethod
    def from_config(cls, cfg) -> "EncoderSpec":
        """From a Hydra `encoder` node (extra keys such as batch_size are ignored)."""
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})

    @classmethod
    def from_checkpoint(cls, encoder: dict) -> "EncoderSpec":
        """From a checkpoint's hparams['encoder']. One saved without `resize` was trained on centre-cropped
        images, the only transform there was before the field."""
        return cls(**{"resize": "crop", **dict(encoder)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def arch(self) -> str:
        return self.timm_name.split(".")[0]

    @property
    def weights_file(self) -> bool:
        """Whether `weights` names a file (rather than hub / package / none)."""
        return str(self.weights) not in WEIGHT_SOURCES

    def timm_kwargs(self) -> dict:
        """The arguments of `timm.create_model` besides the name: no classifier, and a ViT built for `input_size`."""
        kwargs: dict = {"num_classes": 0}
        if self.arch.startswith("vit"):
            kwargs["img_size"] = self.input_size  # DINOv2 defaults to 518 px; its pos-embed is resampled on load
        return kwargs

    def weights_id(self) -> str:
        """A stable identity of the weights, for cache keys: a file's content hash, so a moved or copied file
        reuses its features; else the source."""
        if not self.weights_file:
            return f"{self.weights}:{self.timm_name}"
        if not self.weights_sha256 and not Path(str(self.weights)).expanduser().is_file():
            raise EncoderWeightsError(no_such_file(str(self.weights)))
        return f"sha256:{self.weights_sha256 or file_sha256(str(self.weights))}"


def no_such_file(weights: str) -> str:
    return (f"encoder.weights={weights}: no such file. Give a state dict file in timm/hub format, or one of "
            "hub | package | none")


def relocate_weights(trained: EncoderSpec, new: str | Path | None, option: str, ckpt: str | Path) -> EncoderSpec:
    """The encoder spec of checkpoint `ckpt`, with its weights file found: at `new` when given, else where training
    read it. The file must hold the weights the checkpoint was trained with (the same SHA-256), since its decoder
    only understands their features. `option` is how the user passes a new location (named in the errors)."""
    if not trained.weights_file:
        if new is not None and str(new) != str(trained.weights):
            raise EncoderWeightsError(
                f"{ckpt} was trained with encoder weights '{trained.weights}', not a file: {option} only gives the "
                "new location of a checkpoint's weights file. Drop it")
        return trained
    recorded = trained.weights_sha256
    if new is None:
        path = Path(str(trained.weights)).expanduser()
        if not path.is_file():
            raise EncoderWeightsError(
                f"{ckpt} was trained with the encoder weights file {trained.weights}, which is missing here. "
                f"If the file is elsewhere on this machine, pass it: {option}"
                + (f" (it must have SHA-256 {recorded})" if recorded else ""))
    else:
        path = Path(str(new)).expanduser()
        if not path.is_file():
            raise EncoderWeightsError(
                f"new location of the encoder weights {new}: no such file. Give the path of a copy of "
                f"{trained.weights}, the weights file {ckpt} was trained with")
    actual = file_sha256(path)
    if recorded and actual != recorded:
        raise EncoderWeightsError(
            f"weights file {path} (SHA-256 {actual}) is not the file {ckpt} was trained with: {trained.weights} "
            f"(SHA-256 {recorded}). Its decoder only understands the features of those weights: give a copy of "
            f"that file with {option}")
    if not recorded:
        log.warning("%s records no SHA-256 of its encoder weights file %s: cannot check that %s holds the same "
                    "weights", ckpt, trained.weights, path)
    return replace(trained, weights=str(path), weights_sha256=recorded or actual)
