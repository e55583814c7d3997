"""The configuration's schema: every value `train.py` and `eval.py` read, its type and what is allowed.

Checked once, when a command starts and before anything is built, so that a value that cannot be right
(`decode.beam_size=0`, `loader.batch_size=0`, a misspelled `+decode.beam_sise=3`) is refused with the key, the
value and what is allowed, instead of producing garbage with exit status 0 or a traceback an hour later.

Each section is a dataclass whose fields say their type and bounds (`at_least`, `between`, `one_of`, `flag`);
`check_config` reads the composed config through them and collects every problem into one `ConfigError`. The
trainer's and the optimiser's keys are checked against the signatures of what they instantiate (Lightning's
`Trainer`, the optimiser class), the data reader's options against the reader.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# -- field rules --------------------------------------------------------------------------------------------------


def at_least(low: float, kind: type = int, optional: bool = False, note: str = "") -> Any:
    return field(default=None, metadata={"kind": kind, "low": low, "optional": optional, "note": note})


def between(low: float, high: float, high_open: bool = False, note: str = "") -> Any:
    """A float in [low, high] (or [low, high) with high_open)."""
    return field(default=None, metadata={"kind": float, "low": low, "high": high, "high_open": high_open,
                                         "note": note})


def one_of(*choices: Any, note: str = "") -> Any:
    return field(default=None, metadata={"choices": choices, "note": note})


def flag() -> Any:
    return field(default=None, metadata={"kind": bool})


def integer_or(*words: str, low: int = 0) -> Any:
    """An integer >= low, or one of the words (e.g. `auto`)."""
    return field(default=None, metadata={"kind": int, "low": low, "words": words})


def text(optional: bool = False) -> Any:
    return field(default=None, metadata={"kind": str, "optional": optional})


def _describe(meta: Mapping) -> str:
    """What a field allows, in words: 'an integer >= 1', 'a number in [0, 1)', 'one of greedy | beam'."""
    if "choices" in meta:
        return "one of " + " | ".join(str(c) for c in meta["choices"])
    kind = meta.get("kind")
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string" + (" or null" if meta.get("optional") else "")
    noun = "an integer" if kind is int else "a number"
    if "high" in meta:
        allowed = f"{noun} in [{meta['low']}, {meta['high']}{')' if meta['high_open'] else ']'}"
    elif "low" in meta:
        allowed = f"{noun} >= {meta['low']}"
    else:
        allowed = noun
    if meta.get("words"):
        allowed += " or " + " | ".join(meta["words"])
    if meta.get("optional"):
        allowed += " or null"
    return allowed


def _valid(value: Any, meta: Mapping) -> bool:
    if "choices" in meta:
        return value in meta["choices"]
    if value is None:
        return bool(meta.get("optional"))
    if isinstance(value, str) and value in meta.get("words", ()):
        return True
    kind = meta.get("kind")
    if kind is bool or kind is str:
        return isinstance(value, kind)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind is int and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    if "low" in meta and value < meta["low"]:
        return False
    if "high" in meta and (value >= meta["high"] if meta["high_open"] else value > meta["high"]):
        return False
    return True


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def unknown_keys(keys, allowed, prefix: str) -> list[str]:
    """One problem per key that is not a setting of this section, with the nearest real one as a hint."""
    problems = []
    for key in sorted(set(keys) - set(allowed)):
        near = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
        problems.append(f"{prefix}{key} is not a setting{hint}; the settings there are {', '.join(sorted(allowed))}")
    return problems


def check_section(node: Mapping | None, schema: type, prefix: str, closed: bool = True) -> list[str]:
    """The problems of one config section read through its schema dataclass: keys it does not know (when
    `closed`), keys it needs that are missing, values of the wrong type or out of bounds, then the section's own
    cross-field checks (`schema.relations(values)`)."""
    if node is None:
        return [f"{prefix.rstrip('.')} is missing from the configuration"]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    problems = unknown_keys(node.keys(), fields, prefix) if closed else []
    values = {}
    for name, f in fields.items():
        if name not in node:
            if not f.metadata.get("optional"):
                problems.append(f"{prefix}{name} is missing: it must be {_describe(f.metadata)}")
            continue
        value = node[name]
        if not _valid(value, f.metadata):
            note = f" ({f.metadata['note']})" if f.metadata.get("note") else ""
            problems.append(f"{prefix}{name}={_shown(value)} cannot work: allowed is {_describe(f.metadata)}{note}")
        else:
            values[name] = value
    if not problems and hasattr(schema, "relations"):
        problems += schema.relations(values, prefix)
    return problems


def check_keyword_options(node: Mapping, target: Callable, prefix: str, skip=("_target_", "_partial_")) -> list[str]:
    """Keys of a node that `target` (a class or function it instantiates) does not take as keyword arguments."""
    params = inspect.signature(target).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    allowed = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return unknown_keys([k for k in node.keys() if k not in skip], allowed, prefix)


# -- the sections -------------------------------------------------------------------------------------------------


@dataclass
class Text:
    min_word_count: int = at_least(1, note="the vocabulary keeps words seen at least this often in train")
    max_length: int = at_least(1, note="captions are truncated to this many tokens")


@dataclass
class Loader:
    batch_size: int = at_least(1)
    eval_batch_size: int = at_least(1)
    num_workers: int = at_least(0)
    group_by_image: bool = flag()
    group_by_length: bool = flag()


@dataclass
class Features:
    kind: str = one_of("pooled", "spatial")
    batch_size: int = at_least(1)
    num_workers: int = integer_or("auto")
    device: str = one_of("auto", "cpu", "cuda")


@dataclass
class Scheduler:
    name: str = one_of("warmup_cosine", "none")
    warmup_fraction: float = between(0, 1, high_open=True)
    min_ratio: float = between(0, 1)


@dataclass
class Decode:
    beam_size: int = at_least(1, note="1 = greedy")
    max_len: int = at_least(1, note="the longest caption, in words")
    min_len: int = at_least(0, note="words before <eos> may end the caption")
    length_penalty: float = at_least(0.0, kind=float, note="0 = none; GNMT's alpha, typically up to 1")
    suppress_unk: bool = flag()

    @staticmethod
    def relations(v: dict, prefix: str) -> list[str]:
        if v["min_len"] > v["max_len"]:
            return [f"{prefix}min_len={v['min_len']} is more than {prefix}max_len={v['max_len']}: no caption could "
                    "end; allowed is min_len <= max_len"]
        return []


@dataclass
class Metrics:
    meteor: bool = flag()
    tokenizer: str = one_of("auto", "java", "python")


@dataclass
class Recurrent:
    name: str = one_of("rnn", "lstm", "lstm_init")
    feature: str = one_of("pooled")
    embed_dim: int = at_least(1)
    hidden_dim: int = at_least(1)
    num_layers: int = at_least(1)
    dropout: float = between(0, 1, high_open=True)


@dataclass
class Transformer:
    name: str = one_of("transformer")
    feature: str = one_of("spatial")
    d_model: int = at_least(1)
    num_heads: int = at_least(1)
    encoder_layers: int = at_least(0)
    decoder_layers: int = at_least(1, note="cross-attention is how the decoder sees the image")
    ff_dim: int = at_least(1)
    dropout: float = between(0, 1, high_open=True)
    position_std: float = at_least(0.0, kind=float)
    max_len: int = at_least(1, optional=True)

    @staticmethod
    def relations(v: dict, prefix: str) -> list[str]:
        if v["d_model"] % v["num_heads"]:
            return [f"{prefix}d_model={v['d_model']} is not divisible by {prefix}num_heads={v['num_heads']} "
                    "(set by attention.num_heads): each head takes d_model / num_heads dimensions"]
        return []


@dataclass
class Encoder:
    name: str = text()
    timm_name: str = text(optional=True)
    weights: str = text()
    input_size: int = at_least(32, note="pixels per side")
    resize: str = one_of("squash", "crop", "pad")
    crop_pct: float = between(0.05, 1)
    interpolation: str = text(optional=True)

    @staticmethod
    def relations(v: dict, prefix: str) -> list[str]:
        from .encoders import ENCODERS

        if not v.get("timm_name") and v["name"] not in ENCODERS:
            return [f"{prefix}name={v['name']!r} is not a known encoder: allowed is one of {' | '.join(ENCODERS)}, "
                    f"or set {prefix}timm_name to a timm model name"]
        return []


@dataclass
class Shapes:
    name: str = text()
    format: str = one_of("shapes")
    root: str = text()
    num_train: int = at_least(1)
    num_val: int = at_least(1)
    num_test: int = at_least(1)
    seed: int = at_least(0)
    image_size: int = at_least(32)
    captions_per_image: int = at_least(1)


# The config's top-level keys (conf/train.yaml and its groups): a `+key=...` beside them is a typo, not a setting.
TOP_LEVEL = {"attention", "callbacks", "ckpt_path", "data", "decode", "decoder", "encoder", "features",
             "label_smoothing", "loader", "logger", "metrics", "model", "offline_encoder_swap", "optimizer", "paths",
             "run_name", "scheduler", "seed", "task", "text", "trainer"}
SEED = {"kind": int, "low": 0, "high": 2**32 - 1, "high_open": False}


def _check_value(cfg: DictConfig, key: str, meta: Mapping) -> list[str]:
    value = OmegaConf.select(cfg, key, default=None)
    if _valid(value, meta):
        return []
    return [f"{key}={_shown(value)} cannot work: allowed is {_describe(meta)}"]


def check_data(data: Mapping) -> list[str]:
    """The shapes world's sizes, or a real format's reader options (checked against the reader's signature)."""
    if data.get("format") == "shapes":
        return check_section(data, Shapes, "data.")
    from .data.formats import READERS

    problems = unknown_keys(data.keys(), ("name", "format", "root", "split_seed", "reader"), "data.")
    if data.get("format") not in READERS:
        return problems + [f"data.format={_shown(data.get('format'))} is not a known format: allowed is one of "
                           f"shapes | {' | '.join(READERS)}"]
    if "split_seed" in data and not _valid(data["split_seed"], SEED):
        problems.append(f"data.split_seed={_shown(data['split_seed'])} cannot work: allowed is {_describe(SEED)}")
    return problems + check_keyword_options(data.get("reader") or {}, READERS[data["format"]], "data.reader.",
                                            skip=("root",))


# The trainer values checked here; the others are Lightning's to check (it names the key in its own message).
TRAINER_VALUES = {"max_epochs": {"kind": int, "low": 1},
                  "log_every_n_steps": {"kind": int, "low": 1, "optional": True},
                  "gradient_clip_val": {"kind": float, "low": 0, "optional": True}}


def check_trainer(trainer: Mapping) -> list[str]:
    import lightning as L

    problems = check_keyword_options(trainer, L.Trainer.__init__, "trainer.")
    for key, meta in TRAINER_VALUES.items():
        if key in trainer and not _valid(trainer[key], meta):
            problems.append(f"trainer.{key}={_shown(trainer[key])} cannot work: allowed is {_describe(meta)}")
    if "max_epochs" not in trainer:
        problems.append("trainer.max_epochs is missing: the learning-rate schedule needs the number of epochs")
    return problems


def check_optimizer(optimizer: Mapping) -> list[str]:
    from hydra.utils import get_class

    try:
        target = get_class(optimizer["_target_"])
    except Exception as e:  # any import failure is the user's target: say which
        return [f"optimizer._target_={_shown(optimizer.get('_target_'))} cannot be imported ({e})"]
    problems = check_keyword_options(optimizer, target.__init__, "optimizer.")
    for key, meta in (("lr", {"kind": float, "low": 0, "note": ""}), ("weight_decay", {"kind": float, "low": 0})):
        if key in optimizer and not _valid(optimizer[key], meta):
            problems.append(f"optimizer.{key}={_shown(optimizer[key])} cannot work: allowed is {_describe(meta)}")
    if isinstance(optimizer.get("lr"), (int, float)) and optimizer["lr"] == 0:
        problems.append("optimizer.lr=0 cannot work: nothing would be learned; allowed is a number > 0")
    return problems


def _section(cfg: DictConfig, key: str) -> Any:
    """cfg[key] as plain data, interpolations resolved; an interpolation that cannot resolve is a config error."""
    try:
        node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception as e:  # ${oc.env:...} unset, a typo in ${...}: say which key
        raise ConfigError(f"{key}: its value does not resolve: {e}") from None


def check_config(cfg: DictConfig, task: str = "train") -> None:
    """Refuse a composed `train` / `eval` config with any value that cannot work: one ConfigError listing each
    key, its value and what is allowed."""
    c = {name: _section(cfg, name) for name in
         ("text", "loader", "features", "scheduler", "decode", "metrics", "encoder", "decoder", "data", "optimizer")}
    # Not resolved as a whole: its output paths name Hydra's run dir, which only exists inside a Hydra run.
    c["trainer"] = {k: _section(cfg.trainer, k) if k in TRAINER_VALUES else None for k in cfg.trainer} \
        if "trainer" in cfg else None
    problems = unknown_keys(cfg.keys(), TOP_LEVEL | ({"split", "overwrite"} if task == "eval" else set()), "")
    problems += _check_value(cfg, "seed", SEED)
    problems += check_section(c.get("text"), Text, "text.")
    problems += check_section(c.get("loader"), Loader, "loader.")
    problems += check_section(c.get("features"), Features, "features.")
    problems += check_section(c.get("scheduler"), Scheduler, "scheduler.")
    problems += check_section(c.get("decode"), Decode, "decode.")
    problems += check_section(c.get("metrics"), Metrics, "metrics.")
    problems += _check_value(cfg, "label_smoothing", {"kind": float, "low": 0, "high": 1, "high_open": True})
    problems += check_section(c.get("encoder"), Encoder, "encoder.")
    decoder = c.get("decoder") or {}
    problems += check_section(decoder, Transformer if decoder.get("feature") == "spatial" else Recurrent, "decoder.")
    problems += check_data(c.get("data") or {})
    problems += check_trainer(c["trainer"] or {})
    if task == "train":
        problems += check_optimizer(c.get("optimizer") or {})
    else:
        problems += _check_value(cfg, "split", {"choices": ("val", "test")})
        problems += _check_value(cfg, "overwrite", {"kind": bool})
    if c.get("features", {}).get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("features.device=cuda cannot work: no CUDA GPU is visible here; allowed is auto | cpu")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"this configuration has {len(problems)} values that cannot work:\n  "
                          + "\n  ".join(problems))
