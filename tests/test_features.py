"""Feature cache: keys, fp16 memmaps, resume after interruption, unreadable images, DataModule over it."""

import copy
import json

import numpy as np
import pytest
import torch

from captioner.data import dataset_id
from captioner.encoders import EncoderSpec
from captioner.features import cache_key, extract_features, prepare_features
from captioner.features.build import _recorded_chunks


def test_extraction_matches_encoder_and_is_memmapped_fp16(tiny_shapes, lite0, tmp_path):
    recs = tiny_shapes.split("val")
    cache = extract_features(lite0, recs, tmp_path, dataset_id(tiny_shapes), "val", spatial=True,
                             batch_size=8, num_workers=0, progress=False)
    assert isinstance(cache.pooled, np.memmap) and cache.pooled.dtype == np.float16
    assert cache.pooled.shape == (20, 1280) and cache.spatial.shape == (20, 49, 1280)
    assert cache.keys == [r.key for r in recs]
    # row 3 equals a direct forward of image 3
    from captioner.images import load_image

    x = lite0.transform()(load_image(recs[3].image))[None]
    with torch.inference_mode():
        pooled, spatial = lite0(x)
    np.testing.assert_allclose(cache.pooled[3], pooled[0].numpy(), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(cache.spatial[3], spatial[0].numpy(), rtol=1e-2, atol=1e-2)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["grid"] == [7, 7] and manifest["encoder"]["weights"] == "package"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extraction_on_cuda_matches_cpu(tiny_shapes, lite0, tmp_path, monkeypatch):
    """The CUDA path of extraction (uint8 batches normalised on the device, the encoder there) writes the features
    the CPU path writes, to fp16 storage precision. With TF32 off: cuDNN's default TF32 convolutions move single
    7x7-grid activations by up to 0.05 (measured on an H100; the pooled vector stays within 1e-2), which is the
    arithmetic, not the pipeline this test is about."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    recs = tiny_shapes.split("val")
    kw = dict(spatial=True, batch_size=8, num_workers=0, progress=False)
    cpu = extract_features(lite0, recs, tmp_path / "cpu", dataset_id(tiny_shapes), "val", **kw)
    # a copy: extraction moves the encoder to its device, and the session's fixture must stay on the CPU
    cuda = extract_features(copy.deepcopy(lite0), recs, tmp_path / "cuda", dataset_id(tiny_shapes), "val",
                            device="cuda", **kw)
    assert cuda.keys == cpu.keys
    np.testing.assert_allclose(cuda.pooled, cpu.pooled, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cuda.spatial, cpu.spatial, rtol=2e-3, atol=2e-3)


def test_cache_key_changes_with_everything_that_matters():
    spec = EncoderSpec()
    base = cache_key("shapes:x", "train", ["a", "b"], spec, "t1", False)
    assert base == cache_key("shapes:x", "train", ["a", "b"], spec, "t1", False)
    others = [
        cache_key("shapes:y", "train", ["a", "b"], spec, "t1", False),
        cache_key("shapes:x", "val", ["a", "b"], spec, "t1", False),
        cache_key("shapes:x", "train", ["a", "c"], spec, "t1", False),
        cache_key("shapes:x", "train", ["a", "b"], EncoderSpec(input_size=256), "t1", False),
        cache_key("shapes:x", "train", ["a", "b"], EncoderSpec(weights="none"), "t1", False),
        cache_key("shapes:x", "train", ["a", "b"], EncoderSpec(name="dinov2_vits14", weights="hub"), "t1", False),
        cache_key("shapes:x", "train", ["a", "b"], spec, "t2", False),
        cache_key("shapes:x", "train", ["a", "b"], spec, "t1", True),
    ]
    assert len({base, *others}) == len(others) + 1


def test_interrupted_extraction_resumes_and_is_byte_identical(tiny_shapes, lite0, tmp_path):
    recs = tiny_shapes.split("train")[:40]
    ref = extract_features(lite0, recs, tmp_path / "ref", "d", "train", spatial=True, batch_size=8,
                           num_workers=0, progress=False)

    calls = {"n": 0}
    original = lite0.forward

    def dying_forward(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed after 3 batches (24 images) were written
        return original(x)

    lite0.forward = dying_forward
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_features(lite0, recs, tmp_path / "c", "d", "train", spatial=True, batch_size=8,
                             num_workers=0, flush_every=1, progress=False)
    finally:
        del lite0.forward
    partial = next((tmp_path / "c").glob("*.partial"))
    assert sorted(_recorded_chunks(partial)) == [0, 1, 2]  # 3 chunks of 8 images = the 24 written
    assert not list((tmp_path / "c").glob("*/manifest.json"))  # nothing looks complete

    calls["n"] = 0
    lite0.forward = lambda x: (calls.__setitem__("n", calls["n"] + 1), original(x))[1]
    try:
        resumed = extract_features(lite0, recs, tmp_path / "c", "d", "train", spatial=True, batch_size=8,
                                   num_workers=0, progress=False)
    finally:
        del lite0.forward
    assert calls["n"] == 2  # only the 16 remaining images were encoded
    for name in ("global.npy", "spatial.npy"):
        assert (resumed.path / name).read_bytes() == (ref.path / name).read_bytes()


def test_unreadable_images_are_skipped_and_counted(tiny_shapes, lite0, tmp_path):
    recs = [r for r in tiny_shapes.split("test")[:6]]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "text.jpg").write_text("this is not an image")
    good = open(recs[0].image, "rb").read()
    (broken / "truncated.jpg").write_bytes(good[: len(good) // 3])
    from captioner.data.records import CaptionRecord

    bad = [CaptionRecord(image=broken / n, captions=["x"], split="test", key=f"broken/{n}")
           for n in ("empty.jpg", "text.jpg", "truncated.jpg")]
    cache = extract_features(lite0, recs + bad, tmp_path / "c", "d", "test", batch_size=4, num_workers=0,
                             progress=False)
    assert set(cache.failed) == {"broken/empty.jpg", "broken/text.jpg", "broken/truncated.jpg"}
    assert "empty file" in cache.failed["broken/empty.jpg"]
    assert "truncated" in cache.failed["broken/truncated.jpg"]
    assert cache.valid_rows().tolist() == [True] * 6 + [False] * 3


def test_prepare_features_reuses_without_building_encoder(tiny_shapes, tmp_path, monkeypatch):
    spec = EncoderSpec()
    by_split = {"val": tiny_shapes.split("val")}
    first = prepare_features(by_split, spec, tmp_path, "d", num_workers=0, progress=False)
    import captioner.features.build as features

    monkeypatch.setattr(features, "FrozenEncoder", lambda *a, **k: pytest.fail("encoder rebuilt"))
    again = prepare_features(by_split, spec, tmp_path, "d", num_workers=0, progress=False)
    assert again["val"].path == first["val"].path


def test_an_entry_without_its_image_fingerprints_is_rebuilt(tiny_shapes, lite0, tmp_path):
    """sources.json vouches that each row's image is unchanged: an entry without it is rebuilt, byte-identical."""
    from conftest import counting

    recs = tiny_shapes.split("val")[:8]
    kw = dict(batch_size=4, num_workers=0, progress=False)
    first = extract_features(lite0, recs, tmp_path, "d", "val", **kw)
    before = (first.path / "global.npy").read_bytes()
    (first.path / "sources.json").unlink()
    with counting(lite0) as seen:
        again = extract_features(lite0, recs, tmp_path, "d", "val", **kw)
    assert sum(seen) == 8 and (again.path / "sources.json").is_file()
    assert (again.path / "global.npy").read_bytes() == before
