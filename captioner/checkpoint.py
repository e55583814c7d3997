"""Loading a trained captioner from its Lightning checkpoint, as data only.

A checkpoint downloaded from a stranger must never run code: `torch.load(weights_only=True)` only rebuilds
tensors and plain containers, and refuses any pickled object that would call a function when unpickled. All
that a captioner checkpoint needs is plain data: the state dict, and hyper-parameters (vocabulary, decoder
config, encoder spec) that `Captioner.__init__` saved without module objects.
"""

from __future__ import annotations

import importlib
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

import torch

from .errors import UserError


class CheckpointError(UserError, RuntimeError):
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


# -- what a checkpoint's content may hold -------------------------------------------------------------------------
# Bounds far above any real captioner: they only exist so that a hostile checkpoint cannot make the model's
# construction loop for hours (layers are built one by one) or ask for absurd sizes; every size a model really
# has must in addition match the state dict's tensors (checked before anything is allocated).
MAX_WIDTH = 1 << 20  # vocabulary, embedding/hidden/model/feed-forward widths, feature size, positions, grid sides
MAX_LAYERS = 64
MAX_INPUT_SIZE = 2048  # encoder input pixels per side: the encoder runs a probe image of that size when built
MAX_CAPTION_WORDS = 1000  # decoding allocates (images x beams x max_len) ids up front
MAX_BEAM = 100
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # what timm's transforms take

# The hyper-parameters of `Captioner.__init__` that a checkpoint holds (the optimizer and scheduler never are),
# and those a family adds.
HYPER_PARAMETERS = ("vocab", "decoder", "encoder", "model_name", "feature_dim", "grid", "label_smoothing", "decode",
                    "meteor", "tokenizer")
FAMILY_HYPER_PARAMETERS = ("alpha_c", "attention_maps")
REQUIRED = ("vocab", "decoder", "encoder")
# Decoder hyper-parameters that count layers (bounded by MAX_LAYERS) and that are widths (bounded by MAX_WIDTH).
LAYER_COUNTS = ("num_layers", "encoder_layers", "decoder_layers")
WIDTHS = ("embed_dim", "hidden_dim", "d_model", "ff_dim", "max_len", "num_heads", "memory_dim", "attention_dim")
# A `_target_` a checkpoint names: a dotted path inside this package, and nothing else is ever imported for it.
PACKAGE_PATH = re.compile(r"captioner(\.[A-Za-z_][A-Za-z0-9_]*)+")
# The Lightning checkpoint's state-dict key of the tensor whose shape records each size (key, axis), for the
# decoders that have it: the first key present is the witness.
SIZE_WITNESSES = {
    "the vocabulary size (len of vocab.itos)": (("decoder.head.weight", 0),),
    "feature_dim": (("decoder.feat_proj.0.weight", 0), ("decoder.image_norm.weight", 0),
                    ("decoder.image_proj.0.weight", 0)),
    "decoder.hidden_dim": (("decoder.head.weight", 1),),  # recurrent decoders only (the transformer's is d_model)
    "decoder.embed_dim": (("decoder.embed.weight", 1),),
    "decoder.d_model": (("decoder.tok_emb.weight", 1),),
    "decoder.memory_dim": (("decoder.feat_proj.1.weight", 0),),  # Show-Attend-Tell's annotation vectors
    "decoder.ff_dim": (("decoder.blocks.0.mlp.0.weight", 0),),
    "decoder.max_len": (("decoder.pos_emb", 0),),
    "grid rows": (("decoder.row_pos", 0),),
    "grid columns": (("decoder.col_pos", 0),),
}


def damaged(path, problems: list[str]) -> CheckpointError:
    """The error for a checkpoint whose content cannot be right: every problem found, and what to do."""
    return CheckpointError(
        f"{path}: damaged or edited checkpoint: {'; '.join(problems)}. Use the checkpoint exactly as training wrote "
        "it (in <run dir>/checkpoints/), or train a new one")


def load_captioner(path: str | Path, device: str | torch.device = "cpu"):
    """The trained captioner of a checkpoint, in eval mode on `device`.

    A checkpoint's content is checked before anything is built from it: the hyper-parameters' types and bounds,
    the state dict's tensors, then every size the hyper-parameters imply against the state dict's shapes on a
    model built on the meta device (no memory): a damaged or hostile checkpoint is one `CheckpointError` naming
    the path and the problem, never a traceback or an absurd allocation."""
    ckpt = read_checkpoint(path)
    return build_captioner(ckpt["hyper_parameters"], ckpt["state_dict"], path, device)


def build_captioner(hyper_parameters, state_dict, path, device: str | torch.device = "cpu"):
    """A captioner from its hyper-parameters and state dict as read from `path` (a checkpoint, or an exported
    model directory: captioner.export), both checked as untrusted data first (see `load_captioner`)."""
    hp = checked_hyper_parameters(hyper_parameters, path)
    state = checked_state_dict(state_dict, path)
    problems = size_problems(hp, state)
    if problems:
        raise damaged(path, problems)
    family = captioner_class(hp)
    with construction_errors_reported(path), torch.device("meta"):
        skeleton = family(**hp)  # shapes only: a size the state dict does not have is found without allocating it
    problems = state_mismatches(skeleton.state_dict(), state)
    if problems:
        raise damaged(path, [f"its state dict does not fit its own hyper-parameters: {'; '.join(problems)}"])
    with construction_errors_reported(path):
        model = family(**hp)
        model.load_state_dict(state)
    return model.eval().to(device)


def captioner_class(hp: dict):
    """The family that feeds the checkpoint's decoder its features: spatial tokens are attended over."""
    from .modules import AttentionCaptioner, PooledCaptioner

    return AttentionCaptioner if decoder_class(hp["decoder"]).feature == "spatial" else PooledCaptioner


def package_class(target: str) -> type:
    """The class a checkpoint's `_target_` names, imported only from this package: a checkpoint is untrusted, and
    an arbitrary dotted path would run whatever module it names."""
    if not isinstance(target, str) or not PACKAGE_PATH.fullmatch(target):
        raise ValueError("only classes of the captioner package are loaded from a checkpoint")
    module_name, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module_name), name, None)
    if not isinstance(obj, type) or not obj.__module__.startswith("captioner."):
        raise ValueError(f"{module_name} has no class {name}")
    return obj


def decoder_class(decoder: Mapping) -> type:
    return package_class(decoder["_target_"])


def known_decoders() -> list[str]:
    """The decoder classes this package exports (for messages; any decoder class of the package loads)."""
    from . import decoders

    return [f"captioner.decoders.{n}" for n in decoders.__all__
            if isinstance(getattr(decoders, n), type) and decoders.interface_problem(getattr(decoders, n)) is None]


@contextmanager
def construction_errors_reported(path):
    """A safety net behind the explicit checks: what building or loading the model still raises for a content no
    check foresaw is reported as a damaged checkpoint, not a traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise damaged(path, [f"the captioner cannot be built from it ({type(e).__name__}: {detail})"]) from None


# -- the hyper-parameters -----------------------------------------------------------------------------------------

def checked_hyper_parameters(hp, path) -> dict:
    """The checkpoint's hyper-parameters as `Captioner.__init__` takes them, every value checked; a
    CheckpointError listing each problem otherwise."""
    if not isinstance(hp, Mapping):
        raise damaged(path, [f"hyper_parameters is a {type(hp).__name__}, not a mapping"])
    hp = dict(hp)
    problems = [f"hyper_parameters.{key} is missing" for key in REQUIRED if key not in hp]
    allowed = HYPER_PARAMETERS + FAMILY_HYPER_PARAMETERS
    problems += [f"hyper_parameters.{key} is not a captioner setting (allowed: {', '.join(allowed)})"
                 for key in hp if key not in allowed]
    if problems:
        raise damaged(path, problems)
    problems += vocabulary_problems(hp["vocab"])
    problems += decoder_problems(hp["decoder"])
    problems += encoder_problems(hp["encoder"])
    problems += feature_problems(hp.get("feature_dim", 1280), hp.get("grid", (7, 7)))
    if not problems:  # the decode limits and the family's settings depend on the decoder
        problems += decode_problems(hp.get("decode"), hp["decoder"])
        family = captioner_class(hp)
        problems += [f"hyper_parameters.{key} is not a setting of {family.__name__} (its decoder reads "
                     f"{family.feature} features)" for key in FAMILY_HYPER_PARAMETERS
                     if key in hp and key not in schema_parameters(family)]
    problems += small_problems(hp)
    if problems:
        raise damaged(path, problems)
    if "grid" in hp:
        hp["grid"] = tuple(hp["grid"])
    return hp


def schema_parameters(cls) -> list[str]:
    from .schema import parameters

    return list(parameters(cls))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__} ({text[:40]}...)"


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def vocabulary_problems(vocab) -> list[str]:
    from .data.vocabulary import SPECIALS

    if not isinstance(vocab, Mapping) or not isinstance(vocab.get("itos"), (list, tuple)):
        return [f"hyper_parameters.vocab={_shown(vocab)}: allowed is a mapping {{'itos': [word, ...]}}"]
    itos = vocab["itos"]
    if not all(isinstance(w, str) for w in itos):
        return ["hyper_parameters.vocab.itos holds values that are not words (strings)"]
    if tuple(itos[:len(SPECIALS)]) != SPECIALS:
        return [f"hyper_parameters.vocab.itos starts with {list(itos[:len(SPECIALS)])}, not {list(SPECIALS)}"]
    if len(set(itos)) != len(itos):
        return ["hyper_parameters.vocab.itos holds a word twice: word ids would be ambiguous"]
    if len(itos) > MAX_WIDTH:
        return [f"hyper_parameters.vocab.itos has {len(itos)} words: allowed is at most {MAX_WIDTH}"]
    return []


def decoder_problems(decoder) -> list[str]:
    """The decoder's config (`_target_`, settings, its attention's) by the training schema's rules
    (captioner.schema), its classes only from this package, plus bounds on sizes."""
    from . import schema

    if not isinstance(decoder, Mapping):
        return [f"hyper_parameters.decoder={_shown(decoder)}: allowed is a mapping of decoder settings"]
    try:
        cls = decoder_class(decoder)
    except (KeyError, ValueError, ImportError) as e:
        return [f"hyper_parameters.decoder._target_={_shown(decoder.get('_target_'))} is not a decoder class of "
                f"this package ({e}): allowed is one of {' | '.join(known_decoders())}"]
    settings = {**decoder_defaults(cls), **decoder}
    problems = schema.check_decoder(settings, "hyper_parameters.decoder.", resolve=package_class)
    attention = settings.get("attention") if isinstance(settings.get("attention"), Mapping) else {}
    for prefix, node in (("", settings), ("attention.", attention)):
        for key in LAYER_COUNTS + WIDTHS:
            bound = MAX_LAYERS if key in LAYER_COUNTS else MAX_WIDTH
            value = node.get(key)
            if is_integer(value) and value > bound:
                problems.append(f"hyper_parameters.decoder.{prefix}{key}={value}: allowed is an integer in "
                                f"[1, {bound}]")
    return problems


def decoder_defaults(cls) -> dict:
    """A decoder class's default settings that are plain data (a checkpoint may predate one of them)."""
    from .schema import DECODER_RUNTIME, parameters

    plain = (int, float, str, bool, type(None))
    return {n: p.default for n, p in parameters(cls).items()
            if p.default is not p.empty and n not in DECODER_RUNTIME and isinstance(p.default, plain)}


def encoder_problems(encoder) -> list[str]:
    """The encoder spec must name an encoder this suite (or timm) has, with settings it can build."""
    import timm

    from . import schema
    from .encoders import EncoderSpec

    if not isinstance(encoder, Mapping):
        return [f"hyper_parameters.encoder={_shown(encoder)}: allowed is a mapping of encoder settings"]
    fields = EncoderSpec.__dataclass_fields__
    problems = [f"hyper_parameters.encoder.{key} is not an encoder setting (allowed: {', '.join(fields)})"
                for key in encoder if key not in fields]
    defaults = {name: f.default for name, f in fields.items()}
    settings = {**defaults, "resize": "crop", **encoder}  # as EncoderSpec.from_checkpoint reads it
    problems += schema.check_section({k: v for k, v in settings.items() if k in fields}, schema.Encoder,
                                     "hyper_parameters.encoder.", closed=False)
    interpolation = settings.get("interpolation")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        problems.append(f"hyper_parameters.encoder.interpolation={_shown(interpolation)}: allowed is null (the "
                        f"model's own) or one of {' | '.join(INTERPOLATIONS)}")
    size = settings.get("input_size")
    if is_integer(size) and size > MAX_INPUT_SIZE:
        problems.append(f"hyper_parameters.encoder.input_size={size}: allowed is an integer in [32, {MAX_INPUT_SIZE}] "
                        "(pixels per side)")
    if problems:
        return problems
    try:
        spec = EncoderSpec.from_checkpoint(dict(encoder))
    except (TypeError, ValueError) as e:
        return [f"hyper_parameters.encoder: {e}"]
    if not timm.is_model(spec.arch):
        return [f"hyper_parameters.encoder.timm_name={spec.timm_name!r} is not a model timm knows"]
    return []


def feature_problems(feature_dim, grid) -> list[str]:
    problems = []
    if not is_integer(feature_dim) or not 1 <= feature_dim <= MAX_WIDTH:
        problems.append(f"hyper_parameters.feature_dim={_shown(feature_dim)}: allowed is an integer in "
                        f"[1, {MAX_WIDTH}]")
    if not (isinstance(grid, (list, tuple)) and len(grid) == 2 and all(is_integer(s) and 1 <= s <= MAX_WIDTH
                                                                         for s in grid)):
        problems.append(f"hyper_parameters.grid={_shown(grid)}: allowed is (rows, columns), integers in "
                        f"[1, {MAX_WIDTH}]")
    return problems


def decode_problems(decode, decoder: Mapping) -> list[str]:
    """The decode settings (defaults for keys a checkpoint predates) by the schema's rules, within what decoding
    can allocate, and for the transformer within the positions it has."""
    from . import schema
    from .modules import DECODE_DEFAULTS

    if decode is None:
        return []
    if not isinstance(decode, Mapping):
        return [f"hyper_parameters.decode={_shown(decode)}: allowed is a mapping of decode settings"]
    settings = {**DECODE_DEFAULTS, **decode}
    problems = schema.check_section(settings, schema.Decode, "hyper_parameters.decode.", closed=False)
    if problems:
        return problems
    limit = caption_length_limit(decoder)
    if settings["max_len"] > limit:
        problems.append(f"hyper_parameters.decode.max_len={settings['max_len']}: allowed is an integer in "
                        f"[1, {limit}] (the longest caption this decoder can produce)")
    if settings["beam_size"] > MAX_BEAM:
        problems.append(f"hyper_parameters.decode.beam_size={settings['beam_size']}: allowed is an integer in "
                        f"[1, {MAX_BEAM}]")
    return problems


def caption_length_limit(decoder: Mapping) -> int:
    """The longest caption a decoder can produce: its learned positions (`max_len`, the transformer's), else
    MAX_CAPTION_WORDS."""
    positions = {**decoder_defaults(decoder_class(decoder)), **decoder}.get("max_len")
    return min(MAX_CAPTION_WORDS, positions) if is_integer(positions) else MAX_CAPTION_WORDS


# The settings that only label or score a run: (is it valid, what is allowed).
SMALL_SETTINGS = {
    "model_name": (lambda v: isinstance(v, str), "a string"),
    "label_smoothing": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "alpha_c": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number >= 0"),
    "attention_maps": (lambda v: is_integer(v) and 0 <= v <= MAX_BEAM, f"an integer in [0, {MAX_BEAM}]"),
    "meteor": (lambda v: isinstance(v, bool), "true or false"),
    "tokenizer": (lambda v: v in ("auto", "java", "python"), "one of auto | java | python"),
}


def small_problems(hp: dict) -> list[str]:
    return [f"hyper_parameters.{key}={_shown(hp[key])}: allowed is {allowed}"
            for key, (valid, allowed) in SMALL_SETTINGS.items() if key in hp and not valid(hp[key])]


# -- the state dict ----------------------------------------------------------------------------------------------

def checked_state_dict(state, path) -> dict[str, torch.Tensor]:
    """The state dict as names -> dense CPU tensors with finite values."""
    if not isinstance(state, Mapping):
        raise damaged(path, [f"state_dict is a {type(state).__name__}, not a mapping of names to tensors"])
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
           or v.layout != torch.strided or v.is_quantized or v.device.type != "cpu"]
    if bad:
        raise damaged(path, [f"state_dict entries that are not plain tensors: {_listed(bad)}"])
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise damaged(path, [f"state_dict tensors holding NaN or infinite values: {_listed(not_finite)}"])
    return dict(state)


def _listed(items: list[str], most: int = 5) -> str:
    return ", ".join(items[:most]) + (f" ... ({len(items)} in all)" if len(items) > most else "")


def size_problems(hp: dict, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Each main size the hyper-parameters set against the state-dict tensor that records it: the clearest
    message for an edited size (a damaged one of any other kind is caught by `state_mismatches`)."""
    decoder = {**decoder_defaults(decoder_class(hp["decoder"])), **hp["decoder"]}
    grid = tuple(hp.get("grid", (7, 7)))
    values = {"the vocabulary size (len of vocab.itos)": len(hp["vocab"]["itos"]),
              "feature_dim": hp.get("feature_dim", 1280), "grid rows": grid[0], "grid columns": grid[1],
              **{f"decoder.{k}": v for k, v in decoder.items()}}
    problems = []
    for label, witnesses in SIZE_WITNESSES.items():
        present = [(key, axis) for key, axis in witnesses if key in state and state[key].dim() > axis]
        if label not in values or not present:
            continue
        key, axis = present[0]
        if values[label] != state[key].shape[axis]:
            problems.append(f"{label} is {values[label]} in the hyper-parameters, but the state dict's {key} has "
                            f"shape {tuple(state[key].shape)} (so {state[key].shape[axis]})")
    return problems


def state_mismatches(own: Mapping[str, torch.Tensor], state) -> list[str]:
    """How a state dict differs from a model's (`own`: its `state_dict()`, meta tensors will do): missing and
    unexpected keys, shapes, and a tensor of another kind (float vs integer); [] when it fits."""
    if not isinstance(state, Mapping):
        return [f"the state dict is a {type(state).__name__}, not a mapping of names to tensors"]
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    shapes, kinds = [], []
    for key, mine in own.items():
        theirs = state.get(key)
        if not isinstance(theirs, torch.Tensor):
            if key in state:
                kinds.append(f"{key} is a {type(theirs).__name__}, not a tensor")
            continue
        if tuple(theirs.shape) != tuple(mine.shape):
            shapes.append(f"{key}: checkpoint {tuple(theirs.shape)} vs model {tuple(mine.shape)}")
        elif theirs.is_floating_point() != mine.is_floating_point() or theirs.is_complex():
            kinds.append(f"{key}: checkpoint {theirs.dtype} vs model {mine.dtype}")
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
                         ("wrong tensor types", kinds)):
        if items:
            parts.append(f"{len(items)} {title}: {_listed(items)}")
    return parts


def check_state_matches(model: torch.nn.Module, ckpt: dict, path, action: str = "resume") -> None:
    """Refuse to resume training from (or, `action="fine-tune"`, start stage=scst from) a checkpoint whose weights
    do not fit the model this run's configuration builds (another decoder, other sizes, another encoder's feature
    size, another vocabulary): loading would fail deep inside Lightning, or worse, a vocabulary of the same size
    would silently give words new meanings."""
    problems = state_mismatches(model.state_dict(), ckpt.get("state_dict"))
    theirs = (ckpt.get("hyper_parameters") or {}).get("vocab")
    ours = dict(getattr(model, "hparams", None) or {}).get("vocab")
    if not problems and isinstance(theirs, Mapping) and isinstance(ours, Mapping) and \
            list(theirs.get("itos", [])) != list(ours.get("itos", [])):
        problems.append(f"the vocabulary differs ({len(theirs.get('itos', []))} words in the checkpoint, "
                        f"{len(ours.get('itos', []))} built from this run's data)")
    if problems:
        config = Path(path).expanduser().resolve().parent.parent / ".hydra" / "config.yaml"
        where = f" ({config} lists them)" if config.is_file() else ""
        key = "ckpt_path" if action == "resume" else "init_from"
        raise CheckpointError(
            f"{path}: cannot {action} from it: its weights do not fit the model this configuration builds: "
            f"{'; '.join(problems)}. Use the same model/decoder/encoder/data settings as the run that wrote "
            f"it{where}, or another {key}")


def check_features_match(model, dim: int, grid, source: str, path) -> None:
    """Refuse features the checkpoint's decoder was not trained on: another size, or (attention variant) another
    grid of image tokens. `source` says where the features come from (an encoder, a feature cache)."""
    trained_grid = tuple(model.hparams.grid)
    spatial = model.decoder.feature == "spatial"
    if dim != model.hparams.feature_dim or (spatial and tuple(grid) != trained_grid):
        expected = f"{model.hparams.feature_dim}-d features" + (f" on a {trained_grid} grid" if spatial else "")
        given = f"{dim}-d" + (f" on {tuple(grid)}" if spatial else "")
        raise CheckpointError(
            f"{path}: the decoder expects {expected}, but {source} gives {given}: the checkpoint's encoder settings "
            "do not reproduce its training (use the encoder it records, or a checkpoint trained on this one)")
