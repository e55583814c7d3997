"""Hydra configuration shared by the user commands.

`conf/` sits at the top of the repository (beside `train.py`). The data commands compose the same `train` config
as training, so `data=... encoder=...` overrides mean the same thing everywhere.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line overrides, without Hydra creating a run directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not CONF_DIR.is_dir():
        raise SystemExit(f"configuration folder {CONF_DIR} not found: install the suite from a clone of the "
                         "repository with `make install` (pip install -e .)")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def command_main(run, argv: Sequence[str] | None = None) -> int:
    """Entry point shared by the data commands: `python -m captioner.X key=value ...`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(run.__doc__)
        return 0
    from .data import DatasetError
    from .encoders import EncoderWeightsError

    try:
        return run(compose(argv)) or 0
    except (DatasetError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
