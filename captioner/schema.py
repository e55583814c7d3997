"""The configuration's schema: every value `train.py` and `eval.py` read, its type and what is allowed.

Checked once, when a command starts and before anything is built, so that a value that cannot be right
(`decode.beam_size=0`, `loader.batch_size=0`, a misspelled `+decode.beam_sise=3`) is refused with the key, the
value and what is allowed, instead of producing garbage with exit status 0 or a traceback an hour later.

Each section is a dataclass whose fields say their type and bounds (`at_least`, `between`, `one_of`, `flag`);
`check_config` reads the composed config through them and collects every problem into one `ConfigError`. The
parts Hydra builds (`_target_` nodes: the trainer, the optimiser and scheduler, the model family, the decoder and
its attention, the data reader, the DataModule) have their keys checked against the signature of what they build,
so a new decoder or reader needs no entry here; settings that many parts share (`hidden_dim`, `dropout`, ...) are
held to one rule each, whichever part takes them (`PART_RULES`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

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
    if kind is dict:
        return "a mapping"
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
    if kind is dict:
        return isinstance(value, Mapping)
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
    resident: Any = one_of("auto", True, False, note="auto = on a GPU when the features fit resident_budget")
    resident_budget: float = between(0.0, 1.0, note="the share of free device memory (RAM on CPU) they may take")


@dataclass
class LrScaling:
    rule: str = one_of("none", "linear", "sqrt")
    base_batch_size: int = at_least(1, note="the batch size optimizer.lr was chosen at")


@dataclass
class Features:
    batch_size: int = at_least(1)
    num_workers: int = integer_or("auto")
    device: str = one_of("auto", "cpu", "cuda")
    decode: str = one_of("auto", "pil", "device", note="auto = device on CUDA, pil on CPU")


@dataclass
class Decode:
    beam_size: int = at_least(1, note="1 = greedy")
    max_len: int = at_least(1, note="the longest caption, in words")
    min_len: int = at_least(0, note="words before <eos> may end the caption")
    length_penalty: float = at_least(0.0, kind=float, note="0 = none; GNMT's alpha, typically up to 1")
    suppress_unk: bool = flag()
    block_trigrams: bool = flag()
    sample: bool = flag()
    temperature: float = at_least(0.01, kind=float, note="1 = the model's own distribution; lower is greedier")
    top_k: int = at_least(0, note="0 = sample from every word")

    @staticmethod
    def relations(v: dict, prefix: str) -> list[str]:
        if v["sample"] and v["beam_size"] > 1:
            return [f"{prefix}sample=true samples one caption word by word, but {prefix}beam_size={v['beam_size']} "
                    "asks for beam search; allowed is one of them (beam_size=1 with sampling)"]
        if v["min_len"] > v["max_len"]:
            return [f"{prefix}min_len={v['min_len']} is more than {prefix}max_len={v['max_len']}: no caption could "
                    "end; allowed is min_len <= max_len"]
        return []


@dataclass
class Reward:
    cider: float = at_least(0.0, kind=float)
    bleu_4: float = at_least(0.0, kind=float)

    @staticmethod
    def relations(v: dict, prefix: str) -> list[str]:
        if v["cider"] + v["bleu_4"] <= 0:
            return [f"{prefix}cider and {prefix}bleu_4 are both 0: there would be nothing to learn; allowed is a "
                    "positive weight on at least one"]
        return []


@dataclass
class SelfCriticalTraining:
    samples: int = at_least(1, note="captions sampled per image")
    temperature: float = at_least(0.01, kind=float, note="1 = the model's own distribution")
    top_k: int = at_least(0, note="0 = sample from every word")
    baseline: str = one_of("greedy", "mean")
    reward: dict = field(default=None, metadata={"kind": dict})

    @staticmethod
    def relations(v: dict, prefix: str) -> list[str]:
        if v["baseline"] == "mean" and v["samples"] < 2:
            return [f"{prefix}baseline=mean is the mean reward of an image's other samples, but {prefix}samples="
                    f"{v['samples']}; allowed is samples >= 2, or baseline=greedy"]
        return []


@dataclass
class Metrics:
    meteor: bool = flag()
    tokenizer: str = one_of("auto", "java", "python")


# Settings of the built parts (decoders, their attention, the model family, the scheduler), by name: any part
# that takes a setting of this name is held to its rule.
PART_RULES: dict[str, Mapping] = {name: f.metadata for name, f in {
    "embed_dim": at_least(1), "hidden_dim": at_least(1), "num_layers": at_least(1), "d_model": at_least(1),
    "num_heads": at_least(1), "encoder_layers": at_least(0), "memory_dim": at_least(1), "attention_dim": at_least(1),
    "decoder_layers": at_least(1, note="cross-attention is how the decoder sees the image"), "ff_dim": at_least(1),
    "dropout": between(0, 1, high_open=True), "position_std": at_least(0.0, kind=float), "max_len": at_least(1),
    "alpha_c": at_least(0.0, kind=float, note="0 = no attention regulariser"), "attention_maps": at_least(0),
    "warmup_fraction": between(0, 1, high_open=True), "min_ratio": between(0, 1),
}.items()}
# What a part is given when it is built rather than by its config: the data's sizes (decoders), the decoder's
# width and dropout (attention), the optimiser and the run's length (scheduler).
DECODER_RUNTIME = ("vocab_size", "feature_dim", "grid")
ATTENTION_RUNTIME = ("d_model", "dropout")
SCHEDULER_RUNTIME = ("optimizer", "total_steps")
BUILD_KEYS = ("_target_", "_partial_")


def target_of(node: Mapping, prefix: str, resolve: Callable[[str], Any] | None = None) -> tuple[Any, list[str]]:
    """The class or function a `_target_` node builds, resolved by `resolve` (default: Hydra's import of any
    dotted path), and the problems found on the way."""
    from hydra.utils import get_object

    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str) or not target:
        return None, [f"{prefix}_target_ is missing: name the class or function it builds"]
    try:
        return (resolve or get_object)(target), []
    except Exception as e:  # any import failure is the config's target: say which
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return None, [f"{prefix}_target_={_shown(target)} cannot be imported ({detail})"]


def parameters(target: Callable) -> dict[str, inspect.Parameter]:
    """The named parameters `target` takes: a function's, or a class's `__init__`'s, followed up the class
    hierarchy while an `__init__` hands `**kwargs` on to its base."""
    chain = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] if isinstance(target, type) else [target]
    out: dict[str, inspect.Parameter] = {}
    for fn in chain:
        params = inspect.signature(fn).parameters
        for n, p in params.items():
            if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                out.setdefault(n, p)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return out


def check_part(node: Mapping, target: Callable, prefix: str, runtime: Sequence[str] = (),
               partial: bool = True) -> list[str]:
    """A built part's node against what it builds: keys it does not take (with the nearest as a hint), settings
    it needs that are missing, `_partial_` where the part is completed later, and the values `PART_RULES` knows."""
    params = parameters(target)
    takes = [n for n in params if n not in runtime]
    problems = unknown_keys([k for k in node if k not in BUILD_KEYS], takes, prefix)
    problems += [f"{prefix}{n} is missing: {getattr(target, '__name__', target)} needs it" for n in takes
                 if params[n].default is params[n].empty and n not in node]
    if partial and node.get("_partial_") is not True:
        problems.append(f"{prefix}_partial_={_shown(node.get('_partial_'))} cannot work: allowed is true (the part "
                        "is completed when it is built)")
    for name, value in node.items():
        meta = PART_RULES.get(name)
        if meta is not None and not _valid(value, meta):
            note = f" ({meta['note']})" if meta.get("note") else ""
            problems.append(f"{prefix}{name}={_shown(value)} cannot work: allowed is {_describe(meta)}{note}")
    return problems


def check_decoder(node: Mapping, prefix: str = "decoder.", resolve: Callable[[str], Any] | None = None) -> list[str]:
    """A decoder node: its class (the decoder interface of captioner.decoders), its settings, and its attention
    mechanism (a part of its own) with the widths they must share."""
    from torch import nn

    from .decoders import interface_problem

    if not isinstance(node, Mapping):
        return [f"{prefix.rstrip('.')}={_shown(node)}: allowed is a mapping of decoder settings"]
    cls, problems = target_of(node, prefix, resolve)
    if cls is None:
        return problems
    why = interface_problem(cls)
    if why:
        return [f"{prefix}_target_={_shown(node['_target_'])} is not a decoder: {why}"]
    problems += check_part(node, cls, prefix, DECODER_RUNTIME)
    attention = node.get("attention")
    if isinstance(attention, Mapping):
        att_cls, att_problems = target_of(attention, f"{prefix}attention.", resolve)
        problems += att_problems
        if att_cls is not None and not (isinstance(att_cls, type) and issubclass(att_cls, nn.Module)
                                        and callable(getattr(att_cls, "keys_values", None))):
            problems.append(f"{prefix}attention._target_={_shown(attention['_target_'])} is not an attention "
                            "mechanism (an nn.Module with keys_values, as captioner.decoders.MultiHeadAttention)")
        elif att_cls is not None:
            problems += check_part(attention, att_cls, f"{prefix}attention.", ATTENTION_RUNTIME)
        # the width the attention works in: the transformer's d_model, Show-Attend-Tell's memory_dim
        name = "d_model" if "d_model" in node else "memory_dim"
        heads, width = attention.get("num_heads"), node.get(name)
        if not problems and isinstance(heads, int) and isinstance(width, int) and heads > 0 and width % heads:
            problems.append(f"{prefix}{name}={width} is not divisible by {prefix}attention.num_heads={heads}: each "
                            f"head takes {name} / num_heads dimensions")
    elif attention is not None:
        problems.append(f"{prefix}attention={_shown(attention)}: allowed is an attention mechanism (attention=...) or "
                        "null")
    return problems


def check_model(node: Mapping) -> list[str]:
    """The model node: a name, and the LightningModule family (`_target_`, set by attention/) with its own settings
    (the rest of its arguments come from the other sections)."""
    from .modules import Captioner

    cls, problems = target_of(node, "model.")
    if cls is None:
        return problems
    if not (isinstance(cls, type) and issubclass(cls, Captioner)):
        return [f"model._target_={_shown(node['_target_'])} is not a captioner LightningModule (a subclass of "
                "captioner.modules.Captioner)"]
    problems = [] if isinstance(node.get("name"), str) else [f"model.name={_shown(node.get('name'))} cannot work: "
                                                            "allowed is a string"]
    if "variant" in node and not _valid(node["variant"], {"kind": int, "low": 1}):
        problems.append(f"model.variant={_shown(node['variant'])} cannot work: allowed is an integer >= 1")
    own = {k: v for k, v in node.items() if k not in ("name", "variant")}
    given_by_code = [n for n in inspect.signature(Captioner.__init__).parameters if n != "self"]
    return problems + check_part(own, cls, "model.", given_by_code, partial=False)


def check_scheduler(node: Mapping | None) -> list[str]:
    if node is None:
        return []  # scheduler=none: a constant learning rate
    if not isinstance(node, Mapping):
        return [f"scheduler={_shown(node)}: allowed is a scheduler (scheduler=...) or null"]
    target, problems = target_of(node, "scheduler.")
    return problems or check_part(node, target, "scheduler.", SCHEDULER_RUNTIME)


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
        from .encoders import known_encoders

        known = known_encoders()
        if not v.get("timm_name") and v["name"] not in known:
            return [f"{prefix}name={v['name']!r} is not a known encoder: allowed is one of {' | '.join(known)}, "
                    f"or set {prefix}timm_name to a timm model name"]
        return []


@dataclass
class Shapes:
    name: str = text()
    root: str = text()
    num_train: int = at_least(1)
    num_val: int = at_least(1)
    num_test: int = at_least(1)
    seed: int = at_least(0)
    image_size: int = at_least(32)
    captions_per_image: int = at_least(1)


# The config's top-level keys (conf/train.yaml and its groups): a `+key=...` beside them is a typo, not a setting.
TOP_LEVEL = {"attention", "callbacks", "ckpt_path", "compile", "data", "datamodule", "decode", "decoder", "encoder",
             "features", "init_from", "label_smoothing", "loader", "logger", "lr_scaling", "metrics", "model",
             "offline_encoder_swap", "optimizer", "paths", "run_name", "scheduler", "scst", "seed", "task", "text",
             "trainer"}
SEED = {"kind": int, "low": 0, "high": 2**32 - 1, "high_open": False}


def _check_value(cfg: DictConfig, key: str, meta: Mapping) -> list[str]:
    value = OmegaConf.select(cfg, key, default=None)
    if _valid(value, meta):
        return []
    return [f"{key}={_shown(value)} cannot work: allowed is {_describe(meta)}"]


def check_data(data: Mapping) -> list[str]:
    """The data node: its reader (`data.reader`, a `_partial_` node whose options are checked against the reader
    function), and the shapes world's sizes or a real dataset's split seed."""
    from .data import is_shapes

    reader = data.get("reader")
    if not isinstance(reader, Mapping):
        return [f"data.reader={_shown(reader)}: allowed is the reader (_target_: a function reading the dataset "
                "from data.root) with its options"]
    target, problems = target_of(reader, "data.reader.")
    if target is not None:
        problems += check_part(reader, target, "data.reader.", runtime=("root", "progress"))
    rest = {k: v for k, v in data.items() if k != "reader"}
    if is_shapes(data):
        return problems + check_section(rest, Shapes, "data.")
    problems += unknown_keys(rest.keys(), ("name", "root", "split_seed"), "data.")
    if "split_seed" in data and not _valid(data["split_seed"], SEED):
        problems.append(f"data.split_seed={_shown(data['split_seed'])} cannot work: allowed is {_describe(SEED)}")
    return problems


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


def check_datamodule(cfg: DictConfig) -> list[str]:
    """The DataModule node's keys against the DataModule (its values are the sections checked above)."""
    node = cfg.get("datamodule")
    if node is None:
        return ["datamodule is missing from the configuration"]
    target, problems = target_of(node, "datamodule.")
    if target is None:
        return problems
    return check_keyword_options({k: None for k in node.keys() if k != "_recursive_"}, target.__init__,
                                 "datamodule.")


def _section(cfg: DictConfig, key: str) -> Any:
    """cfg[key] as plain data, interpolations resolved; an interpolation that cannot resolve is a config error."""
    try:
        node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception as e:  # ${oc.env:...} unset, a typo in ${...}: say which key
        raise ConfigError(f"{key}: its value does not resolve: {e}") from None


def check_stage(cfg: DictConfig) -> list[str]:
    """stage=scst: its settings, and the cross-entropy checkpoint it starts from."""
    scst, init_from = _section(cfg, "scst"), _section(cfg, "init_from")
    if scst is None:
        return [] if init_from is None else [
            f"init_from={_shown(init_from)} is only read by stage=scst (self-critical training starts from those "
            "weights); add stage=scst, or resume a run with ckpt_path=..."]
    if not isinstance(scst, Mapping):
        return [f"scst={_shown(scst)}: allowed is the settings of stage=scst"]
    problems = check_section(scst, SelfCriticalTraining, "scst.")
    if isinstance(scst.get("reward"), Mapping):
        problems += check_section(scst["reward"], Reward, "scst.reward.")
    if not isinstance(init_from, str) or not init_from:
        problems.append("stage=scst fine-tunes a cross-entropy model: add init_from=<its run dir> or "
                        "init_from=<run dir>/checkpoints/best-epochNN.ckpt (a random model would never earn a reward)")
    return problems


def check_config(cfg: DictConfig, task: str = "train") -> None:
    """Refuse a composed `train` / `eval` config with any value that cannot work: one ConfigError listing each
    key, its value and what is allowed."""
    c = {name: _section(cfg, name) for name in
         ("text", "loader", "features", "scheduler", "decode", "metrics", "encoder", "decoder", "data", "optimizer",
          "model")}
    # Not resolved as a whole: its output paths name Hydra's run dir, which only exists inside a Hydra run.
    c["trainer"] = {k: _section(cfg.trainer, k) if k in TRAINER_VALUES else None for k in cfg.trainer} \
        if "trainer" in cfg else None
    problems = unknown_keys(cfg.keys(), TOP_LEVEL | ({"split", "overwrite"} if task == "eval" else set()), "")
    problems += _check_value(cfg, "seed", SEED)
    problems += check_section(c.get("text"), Text, "text.")
    problems += check_section(c.get("loader"), Loader, "loader.")
    problems += check_section(_section(cfg, "lr_scaling"), LrScaling, "lr_scaling.")
    problems += _check_value(cfg, "compile", {"kind": bool})
    problems += check_section(c.get("features"), Features, "features.")
    problems += check_scheduler(c.get("scheduler"))
    problems += check_section(c.get("decode"), Decode, "decode.")
    problems += check_section(c.get("metrics"), Metrics, "metrics.")
    problems += _check_value(cfg, "label_smoothing", {"kind": float, "low": 0, "high": 1, "high_open": True})
    problems += check_section(c.get("encoder"), Encoder, "encoder.")
    problems += check_decoder(c.get("decoder"))
    problems += check_model(c.get("model") or {})
    problems += check_datamodule(cfg)
    problems += check_data(c.get("data") or {})
    problems += check_trainer(c["trainer"] or {})
    if task == "train":
        problems += check_optimizer(c.get("optimizer") or {})
        problems += check_stage(cfg)
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
