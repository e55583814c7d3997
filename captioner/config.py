"""Hydra configuration shared by the user commands.

`conf/` sits at the top of the repository (beside `train.py`). The data commands compose the same `train` config
as training, so `data=... encoder=...` overrides mean the same thing everywhere.
"""

from __future__ import annotations

import logging
import os
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


def options(group: str) -> list[str]:
    """The options of a config group, from its YAML files: `options("model")` lists the variants, once, for the
    Makefile, the sweeps and the tests alike."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def variants() -> list[str]:
    """The model variants (conf/model/*.yaml), in their numbered order (`model.variant`)."""
    from omegaconf import OmegaConf

    number = {name: OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml").model.variant for name in options("model")}
    return sorted(number, key=number.get)


def option_name(group: str, node) -> str:
    """Which option of `group` a composed node came from, for messages and run records: the option whose YAML
    builds the same `_target_` (or, for a null node, the one that sets it to null); else the node's `_target_`."""
    from omegaconf import OmegaConf

    target = node.get("_target_") if node is not None and hasattr(node, "get") else None
    for name in options(group):
        path = CONF_DIR / group / f"{name}.yaml"
        own = OmegaConf.load(path)
        if path.read_text().lstrip().startswith("# @package _global_"):
            own = own.get(group)  # a _global_ option sets its group's node among others
        own_target = own.get("_target_") if own is not None and hasattr(own, "get") else None
        if (node is None and own is None) or (target is not None and own_target == target):
            return name
    return str(target)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_extraction_workers(setting: int | str, device: str) -> int:
    """`features.num_workers=auto` -> how many processes decode and resize images beside the encoder forward.

    On a GPU the forward is fast and decoding is the bottleneck: up to 8 workers, leaving a core for the main
    process. On CPU the workers compete with the forward's own threads: only cores torch leaves idle are worth a
    worker. Measured on 2 cores (EfficientNet-Lite0, batch 8): extraction ran at 0.87-0.90 of the bare forward's
    speed with 1 worker and 0.94-0.95 with none (decode + resize is ~1.7 ms an image, the forward ~20 ms, and a
    worker preempting one of the forward's 2 threads stalls both)."""
    if str(setting) != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device == "cuda":
        return min(8, max(1, cores - 1))
    return min(4, max(0, cores - torch.get_num_threads()))


DECODES = ("pil", "device")


def resolve_decode(setting: str, device) -> str:
    """`features.decode=auto` -> how feature extraction decodes images: `device` (JPEGs decoded in batches on the
    GPU by nvjpeg, resized there) when it runs on CUDA, where PIL in the loader workers is the bottleneck; else
    `pil`, which on CPU is as fast and keeps the caches byte-identical to earlier ones. `pil` and `device` pass."""
    setting = str(setting)
    if setting == "auto":
        return "device" if torch.device(device).type == "cuda" else "pil"
    if setting not in DECODES:
        raise ValueError(f"features.decode={setting!r}: expected auto | {' | '.join(DECODES)}")
    return setting


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16, read from /proc/cpuinfo's flags). Where it
    does, bf16 autocast is 2-3x faster than fp32 (measured on 2 Sapphire Rapids cores: EfficientNet-Lite0 forward
    1.6 -> 0.69 s per 64 images, a dino_lstm_init training step 118 -> 37 ms); where it does not, oneDNN emulates
    bf16 and is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to know, so stay in fp32
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, accelerator: str) -> str:
    """`trainer.precision=auto` -> bf16-mixed where the hardware has bf16 (a CUDA GPU that supports it, or a CPU
    with AMX / AVX512-BF16), else 32-true. Any other value is Lightning's own and passes through."""
    if str(precision) != "auto":
        return precision
    if accelerator in ("gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    if accelerator == "cpu":
        return "bf16-mixed" if cpu_has_bf16() else "32-true"
    raise ValueError(f"trainer.precision=auto is resolved for trainer.accelerator cpu or gpu, not {accelerator!r}; "
                     "set trainer.precision explicitly (e.g. 32-true)")


def command_main(run, argv: Sequence[str] | None = None) -> int:
    """Entry point shared by the data commands: `python -m captioner.X key=value ...`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(run.__doc__)
        return 0
    from .errors import reported_exit_status
    from .schema import check_config

    try:
        cfg = compose(argv)
        check_config(cfg)  # the same schema as train.py: a value that cannot work is refused before any work
        return run(cfg) or 0
    except Exception as e:
        return reported_exit_status(e)
