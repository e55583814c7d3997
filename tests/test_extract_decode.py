"""features.decode=device: JPEGs decoded in batches by torchvision's decode_jpeg and resized as tensors on the
extraction device, checked here on CPU (device="cpu", libjpeg instead of nvjpeg) against the PIL path: the model
input and the features are close, hostile files fail as they do with PIL, and the caches of the two paths are kept
apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.config import resolve_decode
from captioner.data.datamodule import resolved_extraction
from captioner.data.records import CaptionRecord
from captioner.encoders import EncoderSpec, spec_transform, split_transform
from captioner.features import extract_features
from captioner.features.cache import cache_key
from captioner.features.extract import _DeviceDecoder, _device_geometry, decode_path, device_jpeg
from captioner.images import MAX_DECODE_SIDE, ImageReadError, load_image
from conftest import counting

pytestmark = pytest.mark.usefixtures("one_thread")

ORIENTATION = 0x0112


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour waves, edges and noise, asymmetric (so a wrong rotation shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.stack([128 + 100 * np.sin(x / 23 + y / 41), 128 + 90 * np.cos(x / 13 - y / 9),
                       255 * (x / width) * (y > height / 3)], axis=-1)
    pixels += rng.normal(0, 10, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save_jpeg(path: Path, image: Image.Image, orientation: int = 1, **options) -> Path:
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION] = orientation  # stored sideways, shown upright: as phones save photos
    image.save(path, "JPEG", quality=90, exif=exif.tobytes(), **options)
    return path


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """JPEGs of several sizes and aspect ratios, a grey one, a progressive one, EXIF-rotated ones and an MPO."""
    folder = tmp_path_factory.mktemp("jpegs")
    return [
        save_jpeg(folder / "landscape.jpg", photo(500, 375, 1)),
        save_jpeg(folder / "portrait.jpg", photo(375, 500, 2)),
        save_jpeg(folder / "small.jpg", photo(97, 61, 3)),
        save_jpeg(folder / "panorama.jpg", photo(1200, 240, 4)),
        save_jpeg(folder / "thin.jpg", photo(40, 700, 5)),
        save_jpeg(folder / "grey.jpg", photo(320, 200, 6).convert("L")),
        save_jpeg(folder / "progressive.jpg", photo(640, 480, 7), progressive=True),
        save_jpeg(folder / "rotated6.jpg", photo(400, 300, 8), orientation=6),
        save_jpeg(folder / "rotated3.jpg", photo(300, 220, 9), orientation=3),
        save_jpeg(folder / "mirrored5.jpg", photo(260, 400, 10), orientation=5),
        phone_photo(folder / "phone.jpg"),
    ]


def phone_photo(path: Path) -> Path:
    """An MPO, as phones save photos: a JPEG with a second frame appended, EXIF-rotated; the first frame counts."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    photo(360, 240, 17).save(path, "MPO", save_all=True, append_images=[photo(360, 240, 18)], exif=exif.tobytes())
    return path


def device_inputs(paths, image_stage, batch_stage, input_size=224) -> tuple[torch.Tensor, list[str]]:
    """The uint8 model input of decode=device, the way encode_batches makes it (worker read, then batch decode)."""
    payloads = [device_jpeg(p) for p in paths]
    assert all(p is not None for p in payloads), "every test JPEG must take the device path"
    decoder = _DeviceDecoder(_device_geometry(image_stage, batch_stage), image_stage, input_size, "cpu")
    return decoder(payloads, [""] * len(paths), list(paths))


@pytest.mark.parametrize("resize,crop_pct", [("squash", 1.0), ("crop", 1.0), ("crop", 0.875), ("pad", 1.0),
                                             ("pad", 0.875)])
def test_device_input_is_close_to_pil(jpegs, resize, crop_pct):
    """The uint8 model input of both paths, image by image: same size, same orientation, nearly the same values.
    On CPU both decode with libjpeg-turbo, so only the resize differs (PIL's filters, computed in float32 and rounded
    once): measured mean 0.000-0.006, max 2 grey levels. The bounds are tight on purpose: a source shifted by a
    single pixel already gives a mean of 1.9 (crop) to 5.6 (pad) and a max of 17-149 on these images. nvjpeg on a GPU
    decodes differently (IDCT, chroma upsampling) and is not measured here."""
    spec = EncoderSpec(name="efficientnet_lite0", weights="none", resize=resize, crop_pct=crop_pct)
    image_stage, batch_stage = split_transform(spec_transform(spec))
    images, errors = device_inputs(jpegs, image_stage, batch_stage)
    assert errors == [""] * len(jpegs) and images.dtype == torch.uint8
    for path, image in zip(jpegs, images):
        reference = image_stage(load_image(path))
        diff = (image.int() - reference.int()).abs()
        print(f"{resize} {crop_pct} {path.name}: mean {diff.float().mean():.3f} max {diff.max()}")
        assert diff.float().mean() < 0.5, f"{path.name}: mean abs difference {diff.float().mean():.2f}"
        assert diff.max() <= 8, f"{path.name}: max abs difference {diff.max()}"


def test_orientation_follows_exif(jpegs, tmp_path):
    """Every EXIF orientation (decode_jpeg applies none on CUDA: the device path applies them itself, on CPU too)
    gives the PIL path's picture; and a rotated JPEG shows the same picture as one stored upright."""
    spec = EncoderSpec(name="efficientnet_lite0", weights="none", resize="crop")
    image_stage, batch_stage = split_transform(spec_transform(spec))
    oriented = [save_jpeg(tmp_path / f"o{k}.jpg", photo(120, 80, 16), orientation=k) for k in range(1, 9)]
    images, _ = device_inputs(oriented, image_stage, batch_stage)
    for path, image in zip(oriented, images):
        diff = (image.int() - image_stage(load_image(path)).int()).abs()
        assert diff.float().mean() < 0.5, f"{path.name}: mean abs difference {diff.float().mean():.2f}"
    upright = save_jpeg(tmp_path / "upright.jpg", photo(400, 300, 8).transpose(Image.Transpose.ROTATE_270))
    images, _ = device_inputs([upright, jpegs[7]], image_stage, batch_stage)
    assert (images[0].int() - images[1].int()).abs().float().mean() < 3
    unrotated, _ = device_inputs([save_jpeg(tmp_path / "plain.jpg", photo(400, 300, 8))], image_stage,
                                 batch_stage)
    assert (unrotated[0].int() - images[1].int()).abs().float().mean() > 20  # the check can fail


def record(path: Path) -> CaptionRecord:
    return CaptionRecord(image=path, captions=["a picture"], split="train", key=path.name)


def extract(encoder, records, cache_dir, decode, num_workers=0):
    return extract_features(encoder, records, cache_dir, "d", "train", batch_size=4, num_workers=num_workers,
                            flush_every=2, progress=False, decode=decode)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_device_features_agree_with_pil_and_are_cached_apart(jpegs, lite0, tmp_path):
    records = [record(p) for p in jpegs]
    pil = extract(lite0, records, tmp_path, "pil")
    device = extract(lite0, records, tmp_path, "device")
    assert pil.path != device.path and not pil.failed and not device.failed
    similarity = cosines(np.asarray(pil.pooled), np.asarray(device.pooled))
    print("pooled 1 - cosine per image:", 1 - similarity)
    assert similarity.min() > 0.999  # measured 1 - 2e-6 at worst on CPU
    assert extract(lite0, records, tmp_path, "auto").path == pil.path  # auto on CPU: pil, the same cache

    # a repair re-extracts with the path of the cache's key: its bytes come back, not the PIL path's
    written = np.array(device.pooled)
    assert not np.array_equal(written, np.asarray(pil.pooled))  # else this check could not fail
    with open(device.path / "global.npy", "r+b") as f:  # damage row 1 (chunk 0: rows 0-7)
        f.seek(128 + 1 * lite0.dim * 2)
        f.write(b"\xff" * 16)
    with counting(lite0) as seen:
        repaired = extract(lite0, records, tmp_path, "device")
    assert repaired.path == device.path and sum(seen) == 8
    assert np.array_equal(np.asarray(repaired.pooled), written)


def hostile(folder: Path) -> dict[str, Path]:
    """What users have besides plain JPEGs: each must fail (or succeed) as on the PIL path."""
    good = save_jpeg(folder / "good.jpg", photo(320, 240, 11))
    data = good.read_bytes()
    table = data.index(b"\xff\xc4")
    files = {
        "empty": folder / "empty.jpg", "text": folder / "notes.jpg", "truncated": folder / "truncated.jpg",
        # passes the header check and ends in EOI, but libjpeg refuses its Huffman table: decoded by PIL instead
        "bad_table": folder / "bad_table.jpg", "missing": folder / "missing.jpg",
        "png": folder / "picture.png", "cmyk": folder / "cmyk.jpg", "grey": folder / "grey.jpg",
        "rotated": folder / "rotated.jpg", "good": good,
        "huge": folder / "huge.jpg",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image")
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["bad_table"].write_bytes(data[:table + 5] + b"\xff" * 16 + data[table + 21:])
    photo(200, 150, 12).save(files["png"])
    photo(200, 150, 13).convert("CMYK").save(files["cmyk"], "JPEG", quality=90)
    save_jpeg(files["grey"], photo(180, 240, 14).convert("L"))
    save_jpeg(files["rotated"], photo(300, 200, 15), orientation=8)
    Image.new("RGB", (MAX_DECODE_SIDE + 8, 64), (30, 120, 60)).save(files["huge"], "JPEG")
    return files


def test_hostile_files_fail_and_decode_as_with_pil(lite0, tmp_path):
    (tmp_path / "images").mkdir()
    files = hostile(tmp_path / "images")
    taken = {name: device_jpeg(path) is not None for name, path in files.items()}
    assert taken == {"empty": False, "text": False, "truncated": False, "bad_table": True, "missing": False,
                     "png": False, "cmyk": False, "grey": True, "rotated": True, "good": True, "huge": False}
    records = [record(p) for p in files.values()]
    pil = extract(lite0, records, tmp_path / "cache", "pil")
    device = extract(lite0, records, tmp_path / "cache", "device", num_workers=1)  # bytes shipped by a worker
    assert device.path != pil.path
    assert device.failed == pil.failed  # the same files, the same messages (load_image's)
    for name in ("empty", "text", "truncated", "bad_table", "missing"):
        with pytest.raises(ImageReadError) as e:
            load_image(files[name])
        assert device.failed[files[name].name] == str(e.value)
    valid = device.valid_rows()
    assert valid.sum() == 6
    assert not np.asarray(device.pooled)[~valid].any()  # unreadable: zero rows
    assert cosines(np.asarray(pil.pooled)[valid], np.asarray(device.pooled)[valid]).min() > 0.99


def test_decode_setting_resolves_and_keys_the_cache():
    assert resolve_decode("auto", "cpu") == "pil"
    assert resolve_decode("auto", "cuda:0") == "device"
    assert resolve_decode("device", "cpu") == "device" and resolve_decode("pil", "cuda") == "pil"
    with pytest.raises(ValueError, match="features.decode='gpu'"):
        resolve_decode("gpu", "cpu")
    assert resolved_extraction({"device": "cpu", "decode": "auto"})["decode"] == "pil"
    spec = EncoderSpec(name="efficientnet_lite0", weights="package")
    args = ("d", "train", ["a", "b"], spec, "sig", False)
    assert cache_key(*args, "pil") == cache_key(*args)  # caches written before the setting keep their key
    assert cache_key(*args, "device") != cache_key(*args)


def test_a_transform_without_a_tensor_twin_keeps_pil():
    transform = spec_transform(EncoderSpec(name="efficientnet_lite0", weights="none", resize="crop"))
    assert decode_path(transform, "device") == "device" and decode_path(transform, "pil") == "pil"
    transform.transforms.insert(0, lambda image: image)  # a step the tensor path does not know
    assert decode_path(transform, "device") == "pil"
    with pytest.raises(ValueError):
        decode_path(transform, "auto")  # auto is resolved before (resolve_decode)
