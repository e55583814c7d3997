"""What a checkpoint records about its encoder, and how inference gets the same one back: the resize mode, and a
local weights file identified by its SHA-256 so that the checkpoint still works where the file lives elsewhere."""

import hashlib
import json
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.caption import ImageCaptioner, main as caption_main
from captioner.checkpoint import read_checkpoint
from captioner.config import compose
from captioner.data.vocabulary import Vocabulary
from captioner.encoders import EncoderSpec, EncoderWeightsError, create_trunk, relocate_weights
from captioner.evaluation import check_encoder_matches
from captioner.training import ConfigError, build_datamodule, build_model


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, lite0):
    """The packaged Lite0 trunk as a timm-format safetensors file, and a file of the same architecture with
    other weights."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in lite0.trunk.state_dict().items()}
    save_file(state, str(root / "lite0.safetensors"))
    other = dict(state, **{"conv_stem.weight": state["conv_stem.weight"] * 1.5})
    save_file(other, str(root / "other.safetensors"))
    return root


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_checkpoint(path, overrides, seed=0):
    """A checkpoint as training writes it (hyper-parameters from `build_model` of the composed config), with an
    untrained decoder: what matters here is its encoder record."""
    cfg = compose(overrides)
    dm = build_datamodule(cfg)  # builds the encoder spec as training does; reads no data
    fake = types.SimpleNamespace(vocab=Vocabulary([f"w{i}" for i in range(40)]), encoder_spec=dm.encoder_spec,
                                 feature_dim=1280, grid=(7, 7))
    torch.manual_seed(seed)
    module = build_model(cfg, fake)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(240, 320), (200, 150), (96, 96)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def run_caption(args, capsys):
    code = caption_main([*map(str, args), "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


# --- Task A: the resize mode travels with the checkpoint ---------------------------------------------------------

def test_checkpoint_records_the_resize_mode_and_inference_applies_it(tmp_path):
    ckpt = make_checkpoint(tmp_path / "pad.ckpt", ["encoder.resize=pad"])
    assert read_checkpoint(ckpt)["hyper_parameters"]["encoder"]["resize"] == "pad"
    cap = ImageCaptioner(ckpt, device="cpu")
    assert cap.spec.resize == "pad" and "Letterbox" in repr(cap.transform)
    # the default config records squash
    squash = make_checkpoint(tmp_path / "squash.ckpt", [])
    assert read_checkpoint(squash)["hyper_parameters"]["encoder"]["resize"] == "squash"
    # a checkpoint saved before the field existed was trained on centre crops: inference crops too
    ckpt = read_checkpoint(squash)
    del ckpt["hyper_parameters"]["encoder"]["resize"]
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    legacy = ImageCaptioner(tmp_path / "legacy.ckpt", device="cpu")
    assert legacy.spec.resize == "crop" and "Resize(size=224," in repr(legacy.transform)


# --- Task B: a weights file is identified by its content -----------------------------------------------------------

def test_spec_records_the_files_sha256_hashing_it_once_per_file_version(weights_dir, tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    shutil.copy(weights_dir / "lite0.safetensors", path)
    first = sha256(path)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(a) or real(*a))
    specs = [EncoderSpec(weights=str(path)) for _ in range(3)]
    assert {s.weights_sha256 for s in specs} == {first} and len(calls) == 1
    assert EncoderSpec(weights="package").weights_sha256 == ""
    with path.open("ab") as f:  # a new version of the file (size and mtime change) is hashed again
        f.write(b"\0")
    second = EncoderSpec(weights=str(path)).weights_sha256
    assert len(calls) == 2
    monkeypatch.undo()
    assert second == sha256(path) != first


def test_feature_cache_key_follows_the_content_not_the_path(weights_dir, tmp_path):
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copy(weights_dir / "lite0.safetensors", copy)
    here, there = EncoderSpec(weights=str(weights_dir / "lite0.safetensors")), EncoderSpec(weights=str(copy))
    assert here.weights_id() == there.weights_id() == f"sha256:{sha256(copy)}"
    assert EncoderSpec(weights=str(weights_dir / "other.safetensors")).weights_id() != here.weights_id()
    with pytest.raises(EncoderWeightsError, match="no such file"):
        EncoderSpec(weights=str(tmp_path / "absent.safetensors")).weights_id()


def test_a_file_whose_content_changed_is_refused(weights_dir):
    spec = EncoderSpec(weights=str(weights_dir / "lite0.safetensors"),
                       weights_sha256=sha256(weights_dir / "other.safetensors"))
    with pytest.raises(EncoderWeightsError, match="SHA-256"):
        create_trunk(spec)


@pytest.fixture()
def trained_on_a_file(weights_dir, tmp_path):
    """A checkpoint trained with a weights file, and that file (in its own folder, free to be moved)."""
    path = tmp_path / "train-machine" / "lite0.safetensors"
    path.parent.mkdir()
    shutil.copy(weights_dir / "lite0.safetensors", path)
    ckpt = make_checkpoint(tmp_path / "file.ckpt", [f"encoder.weights={path}"])
    return ckpt, path


def test_caption_command_finds_a_moved_weights_file(trained_on_a_file, weights_dir, lite0, tmp_path, capsys):
    ckpt, path = trained_on_a_file
    encoder = read_checkpoint(ckpt)["hyper_parameters"]["encoder"]
    assert encoder["weights"] == str(path) and encoder["weights_sha256"] == sha256(path)
    images = photos(tmp_path)
    code, before, _ = run_caption(["--ckpt", ckpt, images], capsys)
    assert code == 0 and len(before) == 3

    moved = tmp_path / "this-machine" / "weights.safetensors"
    moved.parent.mkdir()
    shutil.move(path, moved)
    code, _, err = run_caption(["--ckpt", ckpt, images], capsys)
    assert code == 2 and str(path) in err and "--encoder-weights" in err and "Traceback" not in err

    code, after, _ = run_caption(["--ckpt", ckpt, images, "--encoder-weights", moved], capsys)
    assert code == 0 and after == before
    # the moved file really is the encoder: the packaged weights' features, exactly
    cap = ImageCaptioner(ckpt, device="cpu", encoder_weights=moved)
    batch = torch.stack([cap.transform(Image.open(f).convert("RGB")) for f in sorted(images.iterdir())])
    with torch.inference_mode():
        torch.testing.assert_close(cap.encoder(batch), lite0(batch), rtol=0, atol=0)

    other = weights_dir / "other.safetensors"
    code, _, err = run_caption(["--ckpt", ckpt, images, "--encoder-weights", other], capsys)
    assert code == 2
    for name in (str(other), sha256(other), str(path), sha256(moved)):
        assert name in err
    code, _, err = run_caption(["--ckpt", ckpt, images, "--encoder-weights", tmp_path / "nope.safetensors"], capsys)
    assert code == 2 and "nope.safetensors" in err and "no such file" in err


def test_caption_command_refuses_encoder_weights_for_a_checkpoint_without_a_file(tmp_path, weights_dir, capsys):
    ckpt = make_checkpoint(tmp_path / "package.ckpt", [])
    code, _, err = run_caption(["--ckpt", ckpt, photos(tmp_path), "--encoder-weights",
                                weights_dir / "lite0.safetensors"], capsys)
    assert code == 2 and "'package'" in err and "--encoder-weights" in err


def test_eval_accepts_a_moved_weights_file_with_the_same_content(trained_on_a_file, weights_dir, tmp_path):
    ckpt, path = trained_on_a_file
    trained = EncoderSpec.from_checkpoint(read_checkpoint(ckpt)["hyper_parameters"]["encoder"])
    default = EncoderSpec.from_config(compose([]).encoder)
    # at its recorded location, no override needed
    assert check_encoder_matches(default, trained, ["data=shapes"], str(ckpt)) == trained

    moved = tmp_path / "moved.safetensors"
    shutil.move(path, moved)
    with pytest.raises(EncoderWeightsError) as e:
        check_encoder_matches(default, trained, ["data=shapes"], str(ckpt))
    assert str(path) in str(e.value) and "encoder.weights=/path" in str(e.value)

    asked = EncoderSpec.from_config(compose([f"encoder.weights={moved}"]).encoder)
    found = check_encoder_matches(asked, trained, [f"encoder.weights={moved}"], str(ckpt))
    assert found.weights == str(moved) and found.weights_sha256 == trained.weights_sha256
    assert {k: v for k, v in found.to_dict().items() if k != "weights"} == \
        {k: v for k, v in trained.to_dict().items() if k != "weights"}

    other = weights_dir / "other.safetensors"
    asked = EncoderSpec.from_config(compose([f"encoder.weights={other}"]).encoder)
    with pytest.raises(EncoderWeightsError) as e:
        check_encoder_matches(asked, trained, [f"encoder.weights={other}"], str(ckpt))
    for name in (str(other), sha256(other), str(path), trained.weights_sha256):
        assert name in str(e.value)


def test_eval_still_refuses_other_encoder_overrides(trained_on_a_file):
    ckpt, _ = trained_on_a_file
    trained = EncoderSpec.from_checkpoint(read_checkpoint(ckpt)["hyper_parameters"]["encoder"])
    for overrides in (["encoder=resnet50"], ["encoder.resize=pad"], ["encoder.input_size=256"],
                      ["encoder.weights=package"]):
        asked = EncoderSpec.from_config(compose(overrides).encoder)
        with pytest.raises(ConfigError, match="Drop the encoder override"):
            check_encoder_matches(asked, trained, overrides, str(ckpt))
    # a setting equal to the checkpoint's is no change
    asked = EncoderSpec.from_config(compose(["encoder.resize=squash"]).encoder)
    assert check_encoder_matches(asked, trained, ["encoder.resize=squash"], str(ckpt)) == trained


def test_relocation_of_a_checkpoint_that_records_no_hash_is_allowed_with_a_warning(weights_dir, caplog):
    recorded = EncoderSpec(weights="/gone/lite0.safetensors")
    assert recorded.weights_sha256 == ""
    new = weights_dir / "lite0.safetensors"
    found = relocate_weights(recorded, new, "--encoder-weights /path/to/file", "old.ckpt")
    assert found.weights == str(new) and found.weights_sha256 == sha256(new)
    assert "records no SHA-256" in caplog.text
