"""Loading a trained captioner from its Lightning checkpoint, as data only.

A checkpoint downloaded from a stranger must never run code: `torch.load(weights_only=True)` only rebuilds
tensors and plain containers, and refuses any pickled object that would call a function when unpickled. All
that a captioner checkpoint needs is plain data: the state dict, and hyper-parameters (vocabulary, decoder
config, encoder spec) that `Captioner.__init__` saved without module objects.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .decoders import DECODERS


class CheckpointError(RuntimeError):
    """A checkpoint that cannot (or must not) be loaded; the message names the file and what to do."""


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, loaded with `weights_only=True` (tensors and plain data only). Local files only: a URL
    or other fsspec path is refused, since Lightning would unpickle such a file in full."""
    if "://" in str(path):
        raise CheckpointError(
            f"{path}: checkpoints are loaded from local files only, where they are checked to hold plain data "
            "(a remote checkpoint would be unpickled in full, which can run code). Download it and pass the local "
            "path")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (a run's checkpoints are in <run dir>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain data, which "
            f"could run code when loaded ({str(e).splitlines()[0][:200]}). A captioner checkpoint never needs them; "
            "only load it without weights_only if you fully trust its source") from None
    except Exception as e:  # truncated file, not a torch file at all ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path}: not a captioner checkpoint (no state_dict / hyper_parameters): train one "
                              "with `python train.py`, its checkpoints are in <run dir>/checkpoints/")
    return ckpt


def load_captioner(path: str | Path, device: str | torch.device = "cpu"):
    """The trained captioner of a checkpoint, in eval mode on `device`."""
    from .models import FAMILIES

    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    name = hp.get("decoder", {}).get("name")
    if name not in DECODERS:
        raise CheckpointError(f"{path}: unknown decoder {name!r} in the checkpoint's hyper-parameters")
    family = "attention" if DECODERS[name].feature == "spatial" else "recurrent"
    model = FAMILIES[family](**hp)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval().to(device)
