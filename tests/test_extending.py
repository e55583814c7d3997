"""Extending the suite is one class (or function) and one YAML: a new decoder and a new dataset reader, written
outside the package into a folder of their own, are trained through `python train.py` without editing any
registry, dispatch or schema of `captioner` (Hydra builds them from their `_target_`)."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import run_script

TOY_PARTS = '''
"""A toy decoder and a toy dataset reader, as a user would write them."""

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from captioner.data.records import CaptionDataset, CaptionRecord, SkipReport


class BagDecoder(nn.Module):
    """Next word from the previous word plus the projected image: no recurrence at all."""

    feature = "pooled"

    def __init__(self, vocab_size: int, feature_dim: int, hidden_dim: int = 16) -> None:
        super().__init__()
        self.image = nn.Linear(feature_dim, hidden_dim)
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, features, captions, image_index=None):
        image = self.image(features)
        if image_index is not None:
            image = image.index_select(0, image_index)
        return self.head(torch.tanh(self.embed(captions[:, :-1]) + image[:, None]))

    def init_state(self, features):
        return {"image": self.image(features)}

    def step(self, tokens, state):
        return self.head(torch.tanh(self.embed(tokens) + state["image"])), state


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def read_colours(root, per_split=(4, 2, 2)) -> CaptionDataset:
    """Plain images of one colour each, captioned with their colour (written into root on first use)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records, names = [], list(COLOURS)
    for split, n in zip(("train", "val", "test"), per_split):
        for i in range(n):
            colour = names[i % len(names)]
            path = root / "images" / f"{split}_{i}.png"
            if not path.exists():
                Image.new("RGB", (64, 64), COLOURS[colour]).save(path)
            records.append(CaptionRecord(path, [f"a {colour} picture", f"this is {colour}"], split,
                                         key=f"images/{path.name}"))
    return CaptionDataset("colours", root, records, SkipReport("colours"))
'''

BAG_YAML = """\
# A bag-of-words decoder: the previous word plus the image, no recurrence.
_target_: toy_parts.BagDecoder
_partial_: true
hidden_dim: 16
"""

COLOURS_YAML = """\
# Plain colour images captioned with their colour.
name: colours
root: ${paths.data_dir}/colours
reader:
  _target_: toy_parts.read_colours
  _partial_: true
  per_split: [4, 2, 2]
"""

TINY = ["data.num_train=8", "data.num_val=2", "data.num_test=2", "data.captions_per_image=1",
        "text.min_word_count=1", "trainer.max_epochs=1", "logger=csv", "metrics.meteor=false", "decode.max_len=6"]


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder outside the package with the user's module and config group files, importable and searched."""
    (tmp_path / "toy_parts.py").write_text(textwrap.dedent(TOY_PARTS))
    (tmp_path / "conf" / "decoder").mkdir(parents=True)
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "decoder" / "bag.yaml").write_text(BAG_YAML)
    (tmp_path / "conf" / "data" / "colours.yaml").write_text(COLOURS_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def train(folder, overrides) -> dict:
    run = folder / "run"
    status, err = run_script("train.py", [f"hydra.searchpath=[file://{folder / 'conf'}]", f"hydra.run.dir={run}",
                                          *overrides], env={"CAPTIONER_ROOT": str(folder / "root")})
    assert status == 0, err
    return json.loads((run / "metrics.json").read_text())


def test_a_new_decoder_is_one_class_and_one_yaml(user_folder):
    metrics = train(user_folder, ["model=dino_lstm", "decoder=bag", *TINY])
    assert metrics["decoder"] == "bag" and metrics["family"] == "pooled" and metrics["epochs"] == 1
    assert metrics["params_trainable"] > 0 and 0.0 <= metrics["test"]["bleu_4"] <= 1.0
    import torch

    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["decoder"] == {"_target_": "toy_parts.BagDecoder", "_partial_": True,
                                                   "hidden_dim": 16}


def test_a_new_dataset_reader_is_one_function_and_one_yaml(user_folder):
    metrics = train(user_folder, ["data=colours", "experiment=none", "encoder=efficientnet_lite0", "model=dino_lstm",
                                  "decoder.hidden_dim=32", "decoder.embed_dim=16", *TINY[4:]])
    assert metrics["data"] == "colours" and metrics["data_stats"]
    predictions = (user_folder / "run" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(p)["image"] for p in predictions] == ["images/test_0.png", "images/test_1.png"]
    assert (user_folder / "root" / "data" / "colours" / "images" / "train_3.png").is_file()


def test_a_misspelled_option_of_a_new_part_is_refused_with_a_hint(user_folder):
    """The schema knows the new part from its signature: no entry was added for it."""
    status, err = run_script("train.py", [f"hydra.searchpath=[file://{user_folder / 'conf'}]", "decoder=bag",
                                          "+decoder.hiden_dim=8", f"hydra.run.dir={user_folder / 'run'}"],
                             env={"CAPTIONER_ROOT": str(user_folder / "root")})
    assert status == 2 and "decoder.hiden_dim" in err and "did you mean decoder.hidden_dim" in err, err
