"""Hostile inputs, part "checkpoint content and the caption CLI" (issue 17): a checkpoint damaged or edited in its
content (state dict, hyper-parameters, sizes, encoder), and every bad flag of `captioner-caption`, end as one
message that names the file or flag, the value and what is allowed, with exit status 2 and no traceback; a
resume from a checkpoint that does not fit the configured model is refused; attention maps are never written
through a planted link.

The checkpoints are tiny (untrained decoders of a few hundred kB, built as training builds them) and damaged the
way an attacker or a bad copy would: loaded as data, edited, saved again."""

from __future__ import annotations

import os
import resource
import sys
import time
import types

import pytest
import torch
from PIL import Image

from captioner.caption import main as caption_main
from captioner.checkpoint import (CheckpointError, check_state_matches, construction_errors_reported,
                                  load_captioner)
from conftest import REPO, run_here, run_script

# Small decoders: the checkpoints are a few hundred kB and load in milliseconds.
RECURRENT = ["decoder.embed_dim=16", "decoder.hidden_dim=32"]
ATTENTION = ["model=dino_attention", "decoder.d_model=32", "decoder.ff_dim=64", "decoder.decoder_layers=1",
             "decoder.encoder_layers=1", "attention.num_heads=2"]
VOCAB = [f"w{i}" for i in range(40)]


def build_module(overrides, vocab=VOCAB, feature_dim=1280, seed=0):
    """A captioner as `train.py` builds it (hyper-parameters from the composed config), untrained."""
    from captioner.config import compose
    from captioner.data.vocabulary import Vocabulary
    from captioner.training import build_datamodule, build_model

    cfg = compose(overrides)
    dm = build_datamodule(cfg)  # the encoder spec as training makes it; reads no data
    fake = types.SimpleNamespace(vocab=Vocabulary(vocab), encoder_spec=dm.encoder_spec, feature_dim=feature_dim,
                                 grid=(7, 7))
    torch.manual_seed(seed)
    return build_model(cfg, fake)


def save_module(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Intact tiny checkpoints: `recurrent` (lstm_init) and `attention` (transformer), Lite0 features."""
    root = tmp_path_factory.mktemp("hostile_ckpts")
    return types.SimpleNamespace(root=root,
                                 recurrent=save_module(build_module(RECURRENT), root / "recurrent.ckpt"),
                                 attention=save_module(build_module(ATTENTION), root / "attention.ckpt"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "red.png")
    return folder / "red.png"


def damaged(src, dst, edit):
    """`src` loaded as data, edited in place by `edit(ckpt)`, saved as `dst`."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def _set(*keys, value):
    """An edit for `damaged`: hyper_parameters[keys[0]][keys[1]]... = value."""
    def edit(c):
        node = c["hyper_parameters"]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def refused(path, *needles) -> str:
    """load_captioner(path) raises CheckpointError whose message names the path and each needle."""
    with pytest.raises(CheckpointError) as e:
        load_captioner(path)
    message = str(e.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def caption(args, capsys):
    """captioner-caption in this process: (exit status, stdout, stderr)."""
    try:
        code = caption_main([*map(str, args), "--device", "cpu"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    """stderr holds exactly one `error:` line and no traceback; that line."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- intact checkpoints still load --------------------------------------------------------------------------------

def test_intact_checkpoints_load(ckpts):
    for path in (ckpts.recurrent, ckpts.attention):
        model = load_captioner(path)
        assert not model.training and model.vocab.itos[4:] == VOCAB


def test_a_checkpoint_older_than_some_settings_still_loads(ckpts, tmp_path):
    """Keys a checkpoint predates take their defaults (as before the checks): not every absence is damage."""
    def legacy(ckpt):
        hp = ckpt["hyper_parameters"]
        del hp["encoder"]["resize"], hp["decode"]["suppress_unk"], hp["decoder"]["dropout"], hp["tokenizer"]

    model = load_captioner(damaged(ckpts.recurrent, tmp_path / "legacy.ckpt", legacy))
    assert model.decode_cfg["suppress_unk"] is True


# -- the state dict ------------------------------------------------------------------------------------------------

def test_missing_state_dict_key(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "missing.ckpt", lambda c: c["state_dict"].pop("decoder.head.bias"))
    refused(path, "missing keys", "decoder.head.bias")


def test_extra_state_dict_key(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "extra.ckpt",
                   lambda c: c["state_dict"].__setitem__("decoder.backdoor.weight", torch.zeros(3)))
    refused(path, "unexpected keys", "decoder.backdoor.weight")


def test_state_dict_tensor_of_the_wrong_shape(ckpts, tmp_path):
    def edit(c):
        c["state_dict"]["decoder.rnn.weight_hh_l0"] = torch.zeros(128, 31)

    refused(damaged(ckpts.recurrent, tmp_path / "shape.ckpt", edit), "decoder.rnn.weight_hh_l0", "(128, 31)",
            "(128, 32)")


def test_state_dict_tensor_of_the_wrong_kind(ckpts, tmp_path):
    def edit(c):
        c["state_dict"]["decoder.head.weight"] = c["state_dict"]["decoder.head.weight"].long()

    refused(damaged(ckpts.recurrent, tmp_path / "int.ckpt", edit), "decoder.head.weight", "torch.int64")


def test_state_dict_with_nan_weights(ckpts, tmp_path):
    def edit(c):
        c["state_dict"]["decoder.head.weight"][0, 0] = float("nan")

    refused(damaged(ckpts.recurrent, tmp_path / "nan.ckpt", edit), "NaN", "decoder.head.weight")


def test_state_dict_that_is_not_a_mapping(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "list.ckpt", lambda c: c.__setitem__("state_dict", [1, 2]))
    refused(path, "state_dict is a list")


def test_state_dict_entry_that_is_not_a_tensor(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "str.ckpt",
                   lambda c: c["state_dict"].__setitem__("decoder.head.bias", "zeros"))
    refused(path, "not plain tensors", "decoder.head.bias")


# -- the hyper-parameters: types -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, needles", [
    ("vocab", ["<pad>", "<sos>"], ["hyper_parameters.vocab=", "allowed is a mapping"]),
    ("vocab", {"itos": "<pad><sos>"}, ["hyper_parameters.vocab=", "'itos'"]),
    ("vocab", {"itos": ["a", "b", "c", "d"]}, ["hyper_parameters.vocab.itos starts with", "<pad>"]),
    ("encoder", ["efficientnet_lite0", "package"], ["hyper_parameters.encoder=", "allowed is a mapping"]),
    ("decoder", "lstm_init", ["hyper_parameters.decoder=", "allowed is a mapping"]),
    ("feature_dim", "1280", ["hyper_parameters.feature_dim='1280'", "an integer"]),
    ("grid", 7, ["hyper_parameters.grid=7", "(rows, columns)"]),
    ("decode", {"beam_size": 0}, ["hyper_parameters.decode.beam_size=0", "an integer >= 1"]),
    ("meteor", "yes", ["hyper_parameters.meteor='yes'", "true or false"]),
    ("backdoor", 1, ["hyper_parameters.backdoor is not a captioner setting"]),
])
def test_hyper_parameter_of_the_wrong_type(ckpts, tmp_path, key, value, needles):
    path = damaged(ckpts.recurrent, tmp_path / "hp.ckpt", lambda c: c["hyper_parameters"].__setitem__(key, value))
    refused(path, *needles)


def test_decoder_setting_of_the_wrong_type(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "hidden.ckpt",
                   lambda c: c["hyper_parameters"]["decoder"].__setitem__("hidden_dim", "32"))
    refused(path, "hyper_parameters.decoder.hidden_dim='32'", "an integer >= 1")


def test_unknown_decoder_setting(ckpts, tmp_path):
    path = damaged(ckpts.attention, tmp_path / "grid.ckpt",
                   lambda c: c["hyper_parameters"]["decoder"].__setitem__("grid", [7, 7]))
    refused(path, "hyper_parameters.decoder.grid is not a setting")


def test_unknown_decoder_name(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "gru.ckpt",
                   lambda c: c["hyper_parameters"]["decoder"].__setitem__("_target_", "captioner.decoders.GRUDecoder"))
    refused(path, "hyper_parameters.decoder._target_='captioner.decoders.GRUDecoder'",
            "captioner.decoders.RNNDecoder | captioner.decoders.LSTMDecoder | captioner.decoders.LSTMInitDecoder | "
            "captioner.decoders.TransformerDecoder")


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "torch.nn.Linear", "captioner.caption.os",
                                    "captioner.decoders.recurrent.nn.LSTM", "captioner.modules.PooledCaptioner"])
def test_a_decoder_target_outside_the_package_is_never_imported(ckpts, tmp_path, target):
    """A checkpoint is untrusted: its `_target_`s name classes of this package that are decoders (attention
    mechanisms), and nothing else is imported or built from it."""
    import sys

    def edit(c):
        c["hyper_parameters"]["decoder"]["_target_"] = target

    before = set(sys.modules)
    refused(damaged(ckpts.recurrent, tmp_path / "target.ckpt", edit), f"hyper_parameters.decoder._target_='{target}'")
    assert set(sys.modules) - before == set()
    attention = damaged(ckpts.attention, tmp_path / "attention.ckpt",
                        _set("decoder", "attention", "_target_", value=target))
    refused(attention, "hyper_parameters.decoder.attention._target_=")


def test_hyper_parameters_that_are_not_a_mapping(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "hp-list.ckpt", lambda c: c.__setitem__("hyper_parameters", [1]))
    refused(path, "hyper_parameters is a list")


# -- the encoder ---------------------------------------------------------------------------------------------------

def test_unknown_encoder_name(ckpts, tmp_path):
    def edit(c):
        c["hyper_parameters"]["encoder"].update(name="resnet9000", timm_name="")

    refused(damaged(ckpts.recurrent, tmp_path / "enc.ckpt", edit), "hyper_parameters.encoder.name='resnet9000'",
            "efficientnet_lite0")


def test_unknown_timm_model(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "timm.ckpt",
                   lambda c: c["hyper_parameters"]["encoder"].__setitem__("timm_name", "no_such_net.in1k"))
    refused(path, "hyper_parameters.encoder.timm_name='no_such_net.in1k'", "timm")


def test_encoder_interpolation_timm_does_not_have(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "interp.ckpt", _set("encoder", "interpolation", value="sinc"))
    refused(path, "hyper_parameters.encoder.interpolation='sinc'", "bicubic")


def test_unknown_encoder_setting(ckpts, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "enc-key.ckpt",
                   lambda c: c["hyper_parameters"]["encoder"].__setitem__("exec", "rm -rf /"))
    refused(path, "hyper_parameters.encoder.exec is not an encoder setting")


# -- sizes: absurd ones are refused before anything is allocated ---------------------------------------------------

ABSURD = {  # id: (checkpoint, edit, what the message must name)
    "hidden_dim=1e9": ("recurrent", _set("decoder", "hidden_dim", value=10**9),
                       ["decoder.hidden_dim=1000000000", "[1, 1048576]"]),
    "hidden_dim=1000": ("recurrent", _set("decoder", "hidden_dim", value=1000),
                        ["decoder.hidden_dim is 1000", "decoder.head.weight", "(44, 32)"]),
    "num_layers=1e9": ("recurrent", _set("decoder", "num_layers", value=10**9),
                       ["decoder.num_layers=1000000000", "[1, 64]"]),
    "num_layers=3": ("recurrent", _set("decoder", "num_layers", value=3),
                     ["missing keys", "decoder.rnn.weight_ih_l1"]),
    "feature_dim=1e9": ("recurrent", _set("feature_dim", value=10**9), ["feature_dim=1000000000"]),
    "vocab=1e5": ("recurrent",
                  _set("vocab", value={"itos": ["<pad>", "<sos>", "<eos>", "<unk>"] + [f"x{i}" for i in range(10**5)]}),
                  ["vocabulary size", "100004", "(44, 32)"]),
    "ff_dim=1e9": ("attention", _set("decoder", "ff_dim", value=10**9), ["decoder.ff_dim=1000000000", "[1, 1048576]"]),
    "d_model=2^20": ("attention", _set("decoder", "d_model", value=2**20),
                     ["decoder.d_model is 1048576", "decoder.tok_emb.weight"]),
    "decoder_layers=1e9": ("attention", _set("decoder", "decoder_layers", value=10**9),
                           ["decoder.decoder_layers=1000000000"]),
    "positions=1e6": ("attention", _set("decoder", "max_len", value=10**6),
                      ["decoder.max_len is 1000000", "decoder.pos_emb"]),
    "grid=1e9x7": ("attention", _set("grid", value=(10**9, 7)), ["hyper_parameters.grid=(1000000000, 7)"]),
    "input_size=1e9": ("recurrent", _set("encoder", "input_size", value=10**9),
                       ["encoder.input_size=1000000000", "[32, 2048]"]),
    "decode.max_len=1e9": ("recurrent", _set("decode", "max_len", value=10**9),
                           ["decode.max_len=1000000000", "[1, 1000]"]),
    "decode.max_len=100": ("attention", _set("decode", "max_len", value=100), ["decode.max_len=100", "[1, 64]"]),
    "beam_size=1e9": ("recurrent", _set("decode", "beam_size", value=10**9),
                      ["decode.beam_size=1000000000", "[1, 100]"]),
}


@pytest.mark.parametrize("case", ABSURD)
def test_absurd_size_is_refused_before_any_allocation(ckpts, tmp_path, case):
    which, edit, needles = ABSURD[case]
    path = damaged(getattr(ckpts, which), tmp_path / "absurd.ckpt", edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    start = time.perf_counter()
    refused(path, *needles)
    assert time.perf_counter() - start < 3.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # under 100 MB more, at peak


# -- feature sizes -------------------------------------------------------------------------------------------------

def test_feature_dim_that_does_not_match_the_state_dict(ckpts, tmp_path):
    path = damaged(ckpts.attention, tmp_path / "fdim.ckpt", _set("feature_dim", value=2048))
    refused(path, "feature_dim is 2048", "decoder.feat_proj.0.weight", "(1280,)")


def test_grid_that_does_not_match_the_state_dict(ckpts, tmp_path):
    path = damaged(ckpts.attention, tmp_path / "grid.ckpt", _set("grid", value=(5, 7)))
    refused(path, "grid rows is 5", "decoder.row_pos", "(7, 32)")


def test_feature_size_that_does_not_match_the_encoder(tmp_path, photo, capsys):
    """Hyper-parameters and state dict agree on 2048-d features (a ResNet's), but the encoder it names (Lite0)
    gives 1280-d: refused when the encoder is built, naming both."""
    path = save_module(build_module(RECURRENT, feature_dim=2048), tmp_path / "resnet-sized.ckpt")
    assert load_captioner(path).hparams.feature_dim == 2048  # consistent in itself
    code, _, err = caption(["--ckpt", path, photo], capsys)
    line = one_error(err)
    assert code == 2 and str(path) in line and "2048-d" in line and "1280-d" in line and "efficientnet_lite0" in line


# -- the safety net behind the checks ------------------------------------------------------------------------------

def test_construction_errors_become_a_checkpoint_error_and_bugs_keep_their_type(tmp_path):
    path = tmp_path / "x.ckpt"
    for error in (TypeError("bad"), ValueError("bad"), KeyError("bad"), RuntimeError("bad")):
        with pytest.raises(CheckpointError, match="cannot be built"):
            with construction_errors_reported(path):
                raise error
    with pytest.raises(ZeroDivisionError):  # not a content problem: a bug keeps its traceback
        with construction_errors_reported(path):
            1 / 0


# -- resuming with another configuration ---------------------------------------------------------------------------

def test_resume_with_the_same_settings_passes(ckpts):
    ckpt = torch.load(ckpts.recurrent, map_location="cpu", weights_only=True)
    check_state_matches(build_module(RECURRENT, seed=1), ckpt, ckpts.recurrent)


def test_resume_with_another_decoder_size_is_refused(ckpts):
    ckpt = torch.load(ckpts.recurrent, map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError) as e:
        check_state_matches(build_module(["decoder.embed_dim=16", "decoder.hidden_dim=64"]), ckpt, ckpts.recurrent)
    message = str(e.value)
    assert str(ckpts.recurrent) in message and "decoder.head.weight" in message and "(44, 32)" in message
    assert "same model/decoder/encoder/data settings" in message


def test_resume_with_another_decoder_is_refused(ckpts):
    ckpt = torch.load(ckpts.recurrent, map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys"):
        check_state_matches(build_module(ATTENTION), ckpt, ckpts.recurrent)


def test_resume_with_another_vocabulary_of_the_same_size_is_refused(ckpts):
    ckpt = torch.load(ckpts.recurrent, map_location="cpu", weights_only=True)
    other = build_module(RECURRENT, vocab=[f"v{i}" for i in range(40)])
    with pytest.raises(CheckpointError, match="vocabulary differs"):
        check_state_matches(other, ckpt, ckpts.recurrent)


# -- the caption CLI: flags ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, allowed", [
    ("--batch-size", "0", "an integer >= 1"), ("--batch-size", "-1", "an integer >= 1"),
    ("--max-len", "0", "an integer >= 1"), ("--max-len", "-1", "an integer >= 1"),
    ("--beam-size", "0", "an integer in [1, 100]"), ("--beam-size", "-1", "an integer in [1, 100]"),
    ("--beam-size", "two", "not an integer"),
])
def test_caption_flag_out_of_range(ckpts, photo, capsys, flag, value, allowed):
    code, _, err = caption(["--ckpt", ckpts.attention, photo, flag, value], capsys)
    line = one_error(err)
    assert code == 2 and flag in line and value in line and allowed in line


def test_caption_max_len_beyond_the_decoders_positions(ckpts, photo, capsys):
    code, _, err = caption(["--ckpt", ckpts.attention, photo, "--max-len", "100"], capsys)
    line = one_error(err)
    assert code == 2 and "--max-len 100" in line and "[1, 64]" in line


def test_caption_device_that_is_not_a_device(ckpts, photo, capsys):
    code, _, err = caption(["--ckpt", ckpts.attention, photo, "--device", "nonsense"], capsys)
    line = one_error(err)
    assert code == 2 and "--device" in line and "'nonsense'" in line and "auto | cpu | cuda" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_caption_device_cuda_without_a_gpu(ckpts, photo, capsys):
    code, _, err = caption(["--ckpt", ckpts.attention, photo, "--device", "cuda"], capsys)
    line = one_error(err)
    assert code == 2 and "--device" in line and "no CUDA GPU" in line and "auto | cpu" in line


def test_caption_attention_maps_pointing_at_a_file(ckpts, photo, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    code, out, err = caption(["--ckpt", ckpts.attention, photo, "--attention-maps", existing], capsys)
    line = one_error(err)
    assert code == 2 and str(existing) in line and "not a directory" in line and not out
    assert existing.read_text() == "mine"


def test_caption_damaged_checkpoint_is_one_message(ckpts, photo, tmp_path, capsys):
    path = damaged(ckpts.attention, tmp_path / "d.ckpt", lambda c: c["state_dict"].pop("decoder.row_pos"))
    code, out, err = caption(["--ckpt", path, photo], capsys)
    line = one_error(err)
    assert code == 2 and not out and str(path) in line and "decoder.row_pos" in line


# -- the caption CLI: attention maps and images --------------------------------------------------------------------

def test_attention_maps_are_never_written_through_a_planted_link(ckpts, photo, tmp_path, capsys):
    maps = tmp_path / "maps"
    maps.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (maps / "red.attention.png").symlink_to(victim)
    code, out, err = caption(["--ckpt", ckpts.attention, photo, "--attention-maps", maps, "--max-len", "3"], capsys)
    assert code == 0, err
    assert victim.read_text() == "precious"
    written = maps / "red.attention.png"
    assert not written.is_symlink() and written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an earlier run's map of the same name is this command's own output: replaced; no temp file is left
    code, _, err = caption(["--ckpt", ckpts.attention, photo, "--attention-maps", maps, "--max-len", "3"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in maps.iterdir()) == ["red.attention.png"]


def test_attention_map_on_a_full_disk_is_one_message_and_leaves_nothing(ckpts, photo, tmp_path, capsys,
                                                                         monkeypatch):
    import errno

    import captioner.caption

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    maps = tmp_path / "maps"
    monkeypatch.setattr(captioner.caption.os, "replace", no_space)
    code, _, err = caption(["--ckpt", ckpts.attention, photo, "--attention-maps", maps, "--max-len", "3"], capsys)
    line = one_error(err)
    assert code == 2 and str(maps / "red.attention.png") in line and "No space left on device" in line
    assert list(maps.iterdir()) == []  # no temp file, no half map


def test_directory_without_images(ckpts, tmp_path, photo, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    code, _, err = caption(["--ckpt", ckpts.attention, empty], capsys)
    line = one_error(err)
    assert code == 2 and str(empty) in line and "no image files" in line
    # beside images that can be captioned: a counted skip
    code, out, err = caption(["--ckpt", ckpts.attention, empty, photo, "--max-len", "3"], capsys)
    assert code == 1 and len(out.splitlines()) == 1 and f"skipped {empty}" in err and "1 skipped" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway (see the test below)")
def test_unreadable_image_is_a_counted_skip(ckpts, tmp_path, photo, capsys):
    locked = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(locked)
    locked.chmod(0)
    try:
        code, out, err = caption(["--ckpt", ckpts.attention, locked, photo, "--max-len", "3"], capsys)
    finally:
        locked.chmod(0o644)
    assert code == 1 and len(out.splitlines()) == 1 and "locked.png" in err and "1 skipped" in err


def test_image_that_cannot_be_opened_for_reading_is_a_counted_skip(ckpts, tmp_path, photo, capsys, monkeypatch):
    """What a chmod 000 file gives a user who is not root: PermissionError when opening it."""
    import captioner.images

    locked = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(locked)
    real_open = captioner.images.Image.open

    def open_(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(captioner.images.Image, "open", open_)
    code, out, err = caption(["--ckpt", ckpts.attention, locked, photo, "--max-len", "3"], capsys)
    assert code == 1 and len(out.splitlines()) == 1 and "locked.png" in err and "permission denied" in err.lower()
    assert "1 skipped" in err and "Traceback" not in err


# -- end to end: the real command ----------------------------------------------------------------------------------

def _command(args, cwd):
    return run_here(["-m", "captioner.caption", *args], cwd=cwd)


@pytest.mark.e2e
def test_command_with_an_absurd_checkpoint_exits_2_with_one_line(ckpts, photo, tmp_path):
    path = damaged(ckpts.recurrent, tmp_path / "absurd.ckpt", _set("decoder", "hidden_dim", value=10**9))
    r = _command(["--ckpt", path, photo, "--device", "cpu"], REPO)
    assert r.returncode == 2 and not r.stdout
    assert r.stderr.strip().splitlines() == [one_error(r.stderr)]
    assert r.stderr.startswith(f"error: {path}: damaged or edited checkpoint") and "hidden_dim=1000000000" in r.stderr


@pytest.mark.e2e
def test_command_with_a_bad_flag_exits_2_with_usage_and_one_error(ckpts, photo):
    r = _command(["--ckpt", ckpts.recurrent, photo, "--batch-size", "0"], REPO)
    line = one_error(r.stderr)
    assert r.returncode == 2 and "--batch-size: 0: must be an integer >= 1" in line and r.stderr.startswith("usage:")


# -- security: a checkpoint never runs code -------------------------------------------------------------------

@pytest.mark.e2e
def test_a_checkpoint_from_a_url_or_with_a_payload_never_runs_code(tmp_path, monkeypatch, capfd):
    """Every way a checkpoint enters (train.py resume, eval.py, the caption CLI): a URL / fsspec path is refused
    (Lightning would unpickle it in full), and a local file carrying a pickled payload is refused before anything
    unpickles it in full; the payload never runs, nothing is fetched."""
    import torch

    from captioner.checkpoint import CheckpointError
    from captioner.errors import ConfigError
    from captioner.training import resume_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, evil)
    for path in (f"file://{evil}", "http://127.0.0.1:9/x.ckpt", f"memory://{evil}"):
        with pytest.raises(CheckpointError, match="local files only"):
            resume_checkpoint(path, tmp_path)
    with pytest.raises(CheckpointError, match="refused"):
        resume_checkpoint(str(evil), tmp_path)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="no .*last.ckpt to resume from"):  # never a silent fresh start
        resume_checkpoint("last", tmp_path)
    # as a user runs it, with the payload really served on 127.0.0.1: refused before any data or model is built,
    # nothing fetched, nothing run
    import functools
    import http.server
    import threading

    fetched = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            fetched.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/evil.ckpt"
        r = run_here(["train.py", f"ckpt_path={url}", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "local files only" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not marker.exists()
        for ckpt in (url, f"file://{evil}", evil):  # eval.py and the caption CLI, in this process
            status, err = run_script("eval.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"],
                                     env={"CAPTIONER_ROOT": str(tmp_path)})
            assert status == 2 and err.startswith("error:") and str(ckpt) in err and "Traceback" not in err, err
            capfd.readouterr()
            assert caption_main(["--ckpt", str(ckpt), str(tmp_path)]) == 2
            assert str(ckpt) in capfd.readouterr().err and not marker.exists()
    finally:
        server.shutdown()
    assert fetched == [] and not (tmp_path / "run" / "metrics.json").exists()
