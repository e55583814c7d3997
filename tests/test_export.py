"""A trained captioner taken out of its run: `captioner-export` writes a self-contained model directory, and
`captioner.Captioner` loads it (or a checkpoint) and captions paths, PIL images, arrays and tensors, giving the
captions the checkpoint, `captioner-caption` and the run's own test predictions give."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import hostile_files, run_cli, run_here

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tiny_attention_run, tmp_path_factory):
    """The session's tiny dino_attention run (its encoder weights from a local file) exported: (root, run dir,
    checkpoint, weights file, model dir)."""
    root, run_dir = tiny_attention_run
    ckpt = json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    model_dir = tmp_path_factory.mktemp("export") / "exported"
    r = run_here(["-m", "captioner.export", ckpt, model_dir], root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, run_dir, ckpt, run_dir.parent / "lite0_copy.safetensors", model_dir


def test_export_writes_a_self_contained_directory(trained):
    _, run_dir, ckpt, weights, model_dir = trained
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "config.json", "encoder.safetensors",
                                                          "model.safetensors", "vocab.json"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["format"] == "captioner" and config["encoder"]["weights"] == "encoder.safetensors"
    assert config["decoder"]["_target_"] == "captioner.decoders.TransformerDecoder"
    assert str(weights) not in (model_dir / "config.json").read_text()  # nothing points back at the training machine
    card = (model_dir / "README.md").read_text()
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert "dino_attention" in card and f"{test['bleu_4']:.4f}" in card and "Captioner.from_pretrained" in card
    vocab = json.loads((model_dir / "vocab.json").read_text())["itos"]
    assert vocab[:4] == ["<pad>", "<sos>", "<eos>", "<unk>"]


SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from captioner import Captioner
model = Captioner.from_pretrained(sys.argv[1], device="cpu")
paths = sys.argv[2:]
print(json.dumps({"paths": model.caption(paths, beam_size=2),
                  "one": model.caption(paths[0]),
                  "pil": model.caption([Image.open(p) for p in paths]),
                  "array": model.caption([np.asarray(Image.open(p).convert("RGB")) for p in paths]),
                  "attention": [len(r["words"]) == len(r["attention"]) for r in
                                model.caption(paths, return_attention=True)]}))
"""


def test_round_trip_in_a_fresh_process_without_the_encoder_weights_file(trained, tmp_path):
    """Train -> export -> load in a new process after the training encoder's weights file is gone: the captions
    the checkpoint gave (paths, PIL images, arrays; greedy and beam search) and the run's own test predictions."""
    from captioner import Captioner

    root, run_dir, ckpt, weights, model_dir = trained
    preds = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()][:6]
    paths = [p["image_path"] for p in preds]
    from_ckpt = Captioner.from_pretrained(ckpt, device="cpu")
    expected = from_ckpt.caption(paths)
    assert expected == [p["hypothesis"] for p in preds]  # on the fly = the run's test predictions (cached features)
    expected_beam = from_ckpt.caption(paths, beam_size=2)

    moved = tmp_path / "moved.safetensors"
    shutil.move(weights, moved)  # the training machine's encoder file is gone
    try:
        script = tmp_path / "load.py"
        script.write_text(SCRIPT)
        r = run_cli([script, model_dir, *paths], root, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["paths"] == expected_beam
        assert out["one"] == expected[0] and out["pil"] == expected and out["array"] == expected
        assert all(out["attention"])
        # the checkpoint alone now needs the file: it says so, naming the setting
        r = run_here(["-c", f"from captioner import Captioner; Captioner.from_pretrained({str(ckpt)!r})"], root)
        assert r.returncode != 0 and str(weights) in r.stderr and "encoder_weights" in r.stderr
    finally:
        shutil.move(moved, weights)


def test_caption_command_reads_a_model_directory_and_agrees_with_the_api(trained):
    from captioner import Captioner

    root, run_dir, _, _, model_dir = trained
    paths = [json.loads(x)["image_path"] for x in (run_dir / "predictions.jsonl").read_text().splitlines()][:4]
    r = run_here(["-m", "captioner.caption", "--ckpt", model_dir, *paths, "--json", "--beam-size", "3"], root)
    assert r.returncode == 0, r.stderr[-3000:]
    cli = [json.loads(line)["caption"] for line in r.stdout.splitlines()]
    assert cli == Captioner.from_pretrained(model_dir, device="cpu").caption(paths, beam_size=3)


def test_hostile_inputs_give_a_clear_error_per_image(trained, tmp_path):
    """A text file named .jpg, an image over the pixel limit, a truncated JPEG, a wrong array: each one error
    naming it; errors="return" captions the others."""
    from captioner import Captioner
    from captioner.images import ImageReadError

    _, _, _, _, model_dir = trained
    model = Captioner.from_pretrained(model_dir, device="cpu")
    text, good, truncated, huge = hostile_files(tmp_path)
    for bad, words in ((text, "notes.jpg"), (truncated, "truncated.jpg"), (huge, "pixel limit")):
        with pytest.raises(ImageReadError, match=words):
            model.caption(bad)
    with pytest.raises(ImageReadError, match="image 1: an array of shape"):
        model.caption([good, np.zeros((5, 5, 7))])
    with pytest.raises(ImageReadError, match="image 0: a dict is not an image"):
        model.caption([{}])
    out = model.caption([text, good, truncated, torch.rand(3, 40, 40)], errors="return")
    assert isinstance(out[0], ImageReadError) and isinstance(out[2], ImageReadError)
    assert isinstance(out[1], str) and isinstance(out[3], str)
    with pytest.raises(Exception, match="temperature"):
        model.caption(good, sample=True, temperature=0)


def test_a_damaged_model_directory_is_refused_naming_the_file(trained, tmp_path):
    from captioner import Captioner
    from captioner.errors import UserError

    _, _, _, _, model_dir = trained
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "vocab.json").write_text("{not json")
    with pytest.raises(UserError, match="vocab.json"):
        Captioner.from_pretrained(broken, device="cpu")
    shutil.copy(model_dir / "vocab.json", broken / "vocab.json")
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="model.safetensors"):
        Captioner.from_pretrained(broken, device="cpu")
    with pytest.raises(UserError, match="checkpoint not found"):
        Captioner.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_save_pretrained_is_the_export_layout(trained, tmp_path):
    """ModelHubMixin's save_pretrained (what push_to_hub uploads) writes the same directory, which loads back."""
    from captioner import Captioner

    _, run_dir, _, _, model_dir = trained
    model = Captioner.from_pretrained(model_dir, device="cpu")
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == \
        json.loads((model_dir / "config.json").read_text())
    path = json.loads((run_dir / "predictions.jsonl").read_text().splitlines()[0])["image_path"]
    assert Captioner.from_pretrained(tmp_path / "saved", device="cpu").caption(path) == model.caption(path)


def test_export_refuses_a_non_empty_directory(trained, tmp_path):
    root, _, ckpt, _, _ = trained
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    r = run_here(["-m", "captioner.export", ckpt, tmp_path / "out"], root)
    assert r.returncode == 2 and "not empty" in r.stderr and (tmp_path / "out" / "keep.txt").exists()
