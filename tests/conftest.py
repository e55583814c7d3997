"""Shared fixtures: small shapes worlds and feature caches, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here: fail at once instead of retrying

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A small shapes world (60/20/20 images) as a CaptionDataset."""
    from captioner.data.shapes import build_shapes

    root = tmp_path_factory.mktemp("shapes")
    return build_shapes(root, num_train=60, num_val=20, num_test=20, seed=3, progress=False)


@pytest.fixture(scope="session")
def lite0():
    """The packaged EfficientNet-Lite0 encoder (real ImageNet weights)."""
    from captioner.encoders import EncoderSpec, FrozenEncoder

    return FrozenEncoder(EncoderSpec(name="efficientnet_lite0", weights="package"))
