"""Frozen encoder adapter and weight sources (offline: the hub is unreachable, local files and the package work)."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from captioner.encoders import EncoderSpec, EncoderWeightsError, FrozenEncoder, build_transform, create_trunk


def test_packaged_efficientnet_classifies_real_photos():
    """The package's weights, renamed into timm, must be the real ImageNet weights: check on public-domain photos."""
    skimage_data = pytest.importorskip("skimage.data")
    from captioner.encoders.weights import _packaged_weights_file, rename_efficientnet_pytorch_keys

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(_packaged_weights_file("tf_efficientnet_lite0"), weights_only=True)
    model.load_state_dict(rename_efficientnet_pytorch_keys(state, model), strict=True)
    model.eval()
    info = timm.data.ImageNetInfo()
    transform = build_transform(model, EncoderSpec())
    expected = {"chelsea": {"tabby, tabby cat", "tiger cat", "Egyptian cat"}, "coffee": {"espresso", "cup"}}
    for name, labels in expected.items():
        image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        with torch.no_grad():
            top = model(transform(image)[None]).argmax(-1).item()
        assert info.index_to_description(top) in labels, (name, info.index_to_description(top))


def test_efficientnet_adapter_outputs_pooled_and_grid(lite0):
    assert lite0.dim == 1280 and lite0.grid == (7, 7)
    with torch.inference_mode():
        pooled, spatial = lite0(torch.randn(2, 3, 224, 224))
    assert pooled.shape == (2, 1280) and spatial.shape == (2, 49, 1280)
    # the pooled vector is the mean of the grid (timm's avg pool head)
    torch.testing.assert_close(pooled, spatial.mean(1), atol=1e-4, rtol=1e-4)
    lite0.train()
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())


def test_dinov2_local_file_in_hub_format_resamples_pos_embed(tmp_path):
    """A DINOv2 state dict as the hub ships it (518 px: 37x37+1 position embeddings) loads at 224 px."""
    hub_model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    assert hub_model.pos_embed.shape[1] == 37 * 37 + 1
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(hub_model.state_dict(), path)
    enc = FrozenEncoder(EncoderSpec(name="dinov2_vits14", weights=str(path), input_size=224))
    assert enc.grid == (16, 16) and enc.trunk.pos_embed.shape[1] == 16 * 16 + 1
    torch.testing.assert_close(enc.trunk.blocks[5].attn.qkv.weight, hub_model.blocks[5].attn.qkv.weight)
    # transforms resolved for 224, not the 518 of DINOv2's default config
    assert "224" in repr(enc.transform()) and "518" not in repr(enc.transform())
    with torch.inference_mode():
        pooled, spatial = enc(torch.randn(1, 3, 224, 224))
    assert pooled.shape == (1, 384) and spatial.shape == (1, 256, 384)  # CLS / patch tokens without prefix


def test_local_file_of_wrong_architecture_is_refused_with_keys(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), path)
    with pytest.raises(EncoderWeightsError, match=r"missing keys.*conv1\.weight|shape mismatches") as e:
        create_trunk(EncoderSpec(name="resnet50", weights=str(path)))
    assert str(path) in str(e.value)
    with pytest.raises(EncoderWeightsError, match="no such file"):
        create_trunk(EncoderSpec(name="resnet50", weights=str(tmp_path / "absent.pth")))


def test_hub_unreachable_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderWeightsError, match=r"encoder\.weights=/path/to/"):
        create_trunk(EncoderSpec(name="resnet50", weights="hub"))


def test_random_weights_only_when_asked_and_warned():
    with pytest.warns(UserWarning, match="RANDOM"):
        a = create_trunk(EncoderSpec(name="efficientnet_lite0", weights="none"))
    with pytest.warns(UserWarning):
        b = create_trunk(EncoderSpec(name="efficientnet_lite0", weights="none"))
    torch.testing.assert_close(a.conv_stem.weight, b.conv_stem.weight)  # seeded: features stay cacheable
    with pytest.raises(ValueError, match="encoder.name"):
        EncoderSpec(name="resnet5000")


@pytest.mark.parametrize("resize", ["squash", "crop", "pad"])
@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("resnet50", 224), ("dinov2_vits14", 224)])
def test_split_transform_is_bit_identical_to_the_whole_transform(name, size, resize):
    """Extraction normalises whole batches (`split_transform`): the batch must equal image-by-image transforms
    exactly, for each encoder's mean/std and each resize mode, on square, wide and tall images."""
    from captioner.encoders import spec_transform, split_transform

    transform = spec_transform(EncoderSpec(name=name, input_size=size, resize=resize))
    image_stage, batch_stage = split_transform(transform)
    assert batch_stage is not None
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(224, 224), (200, 310), (333, 180)]]
    staged = [image_stage(im) for im in images]
    assert all(x.dtype == torch.uint8 and x.shape == (3, size, size) for x in staged)
    assert torch.equal(batch_stage(torch.stack(staged)), torch.stack([transform(im) for im in images]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_stage_on_cuda_matches_the_whole_transform_on_cpu():
    """Beside a GPU, extraction ships uint8 images and normalises them on the device: within an ulp of the CPU's."""
    from captioner.encoders import spec_transform, split_transform

    transform = spec_transform(EncoderSpec(name="efficientnet_lite0", input_size=224))
    image_stage, batch_stage = split_transform(transform)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)) for _ in range(4)]
    on_cuda = batch_stage(torch.stack([image_stage(im) for im in images]).cuda())
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.float32
    torch.testing.assert_close(on_cuda.cpu(), torch.stack([transform(im) for im in images]), rtol=1e-6, atol=1e-6)


def test_split_transform_keeps_other_transforms_whole():
    from torchvision import transforms

    from captioner.encoders import split_transform

    custom = transforms.Compose([transforms.Resize(32), transforms.ToTensor()])
    assert split_transform(custom) == (custom, None)


# --- encoder.resize: how much of the image reaches the encoder -----------------------------------------------------

RED, GREEN = (255, 0, 0), (0, 255, 0)


def banded_image(w=320, h=240, band=0.12):
    """A 4:3 image, green inside, with red bands `band` of its width / height along every edge."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = RED
    bx, by = round(band * w), round(band * h)
    a[by:h - by, bx:w - bx] = GREEN
    return Image.fromarray(a)


def encoder_input(name, **spec):
    """The banded image through the encoder's transform, un-normalised to [0, 1] RGB (H, W, 3), the normalised
    tensor, and the normalisation."""
    from captioner.encoders import spec_transform, split_transform

    transform = spec_transform(EncoderSpec(name=name, **spec))
    x = transform(banded_image())
    norm = split_transform(transform)[1]
    rgb = x * torch.tensor(norm.std).view(3, 1, 1) + torch.tensor(norm.mean).view(3, 1, 1)
    return rgb.permute(1, 2, 0).numpy(), x, norm


def is_colour(pixels, colour):
    return np.abs(pixels - np.array(colour) / 255).max() < 0.1


def test_default_resize_is_squash_in_the_spec_and_every_encoder_config():
    from captioner.config import CONF_DIR, compose

    assert EncoderSpec().resize == "squash"
    for path in sorted((CONF_DIR / "encoder").glob("*.yaml")):
        assert compose([f"encoder={path.stem}"]).encoder.resize == "squash", path
    with pytest.raises(ValueError, match=r"encoder\.resize"):
        EncoderSpec(resize="stretch")
    rgb, _, _ = encoder_input("efficientnet_lite0")  # the default transform keeps the left and right bands
    assert is_colour(rgb[60:164, :20], RED) and is_colour(rgb[60:164, -20:], RED)


def test_squash_keeps_every_border_band():
    rgb, x, _ = encoder_input("efficientnet_lite0", resize="squash")
    assert x.shape == (3, 224, 224)
    mid = slice(60, 164)
    # bands are 12 % of each side: about 27 px of 224; the outer 20 px are clear of resampling at their edge
    for band in (rgb[mid, :20], rgb[mid, -20:], rgb[:20, mid], rgb[-20:, mid]):
        assert is_colour(band, RED)
    assert is_colour(rgb[40:184, 40:184], GREEN)


def test_crop_cuts_off_the_left_and_right_bands():
    rgb, _, _ = encoder_input("efficientnet_lite0", resize="crop")
    mid = slice(60, 164)
    # shorter side to 224 makes the image 299 px wide: the centre crop drops 37 px a side, the bands are 27 px
    assert is_colour(rgb[mid, :3], GREEN) and is_colour(rgb[mid, -3:], GREEN)
    assert is_colour(rgb[:15, mid], RED) and is_colour(rgb[-15:, mid], RED)  # top and bottom are kept


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
def test_pad_keeps_the_whole_image_and_pads_with_the_mean_colour(name):
    rgb, x, norm = encoder_input(name, resize="pad")
    # 320x240 -> 224x168, centred: 28 rows of padding above and below
    pad_rows = torch.cat([x[:, :28], x[:, -28:]], dim=1)
    # the padding is the mean colour, so zero after Normalize up to the rounding of the mean to 8 bits
    assert pad_rows.abs().max() <= 0.5 / 255 / min(norm.std) + 1e-6
    mid_rows, mid_cols = slice(70, 154), slice(60, 164)
    for band in (rgb[mid_rows, :20], rgb[mid_rows, -20:], rgb[30:44, mid_cols], rgb[-44:-30, mid_cols]):
        assert is_colour(band, RED)
    assert is_colour(rgb[70:154, 45:179], GREEN)


def test_pad_survives_an_extremely_thin_image():
    from captioner.encoders import spec_transform

    transform = spec_transform(EncoderSpec(resize="pad"))
    assert transform(Image.new("RGB", (2000, 1), RED)).shape == (3, 224, 224)


def test_crop_mode_is_the_transform_of_specs_without_a_resize_mode():
    """resize=crop is timm's centre-crop transform, unchanged; checkpoints that predate the field were trained
    with it, so they load as crop."""
    from captioner.encoders import spec_transform

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    timm_center = timm.data.create_transform(
        **timm.data.resolve_data_config({"input_size": (3, 224, 224), "crop_pct": 1.0}, model=model), is_training=False)
    assert repr(spec_transform(EncoderSpec(resize="crop"))) == repr(timm_center)
    legacy = {k: v for k, v in EncoderSpec().to_dict().items() if k not in ("resize", "weights_sha256")}
    assert EncoderSpec.from_checkpoint(legacy).resize == "crop"
    assert EncoderSpec.from_checkpoint(EncoderSpec(resize="pad").to_dict()).resize == "pad"


def test_each_resize_mode_has_its_own_feature_cache():
    from captioner.encoders import spec_transform, transform_signature
    from captioner.features import cache_key

    keys = {mode: cache_key("shapes:x", "train", ["a", "b"], spec, transform_signature(spec_transform(spec)), False)
            for mode in ("squash", "crop", "pad") for spec in [EncoderSpec(resize=mode)]}
    assert len(set(keys.values())) == 3


def test_a_weights_file_is_loaded_strictly_without_patching_torch(lite0, tmp_path):
    """A file's classifier is dropped; every trunk tensor must come from the file, or the error names the key."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in lite0.trunk.state_dict().items()}
    with_head = tmp_path / "with_head.safetensors"
    save_file({**state, "classifier.weight": torch.zeros(1000, 1280), "classifier.bias": torch.zeros(1000)},
              str(with_head))
    before = torch.nn.Module.load_state_dict
    trunk = create_trunk(EncoderSpec(weights=str(with_head)))
    assert torch.nn.Module.load_state_dict is before
    torch.testing.assert_close(trunk.bn2.weight, lite0.trunk.bn2.weight)
    short = tmp_path / "short.safetensors"
    save_file({k: v for k, v in state.items() if k != "bn2.weight"}, str(short))
    with pytest.raises(EncoderWeightsError, match=r"missing keys: bn2\.weight") as e:
        create_trunk(EncoderSpec(weights=str(short)))
    assert str(short) in str(e.value)
