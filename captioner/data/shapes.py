"""The embedded "shapes" captioning world: a procedurally generated dataset shipped as code.

Each image shows 1-3 non-overlapping coloured shapes on a textured, low-saturation background; each comes with
reference captions drawn from a small grammar ("a large red circle to the left of a small blue square", "there
is an orange star above a purple circle and a yellow square"). With two or more objects every caption states
exactly one spatial relation, so a captioner has to know *where* things are; a pooled feature vector loses
that, a decoder attending over the spatial grid does not.

Because every scene is known (it is stored with its image), a generated caption can be scored semantically
against it: `captioner.scoring.semantic`. The world's vocabulary and geometry live in `captioner.data.scenes`,
which the scorer shares without importing this generator.

Everything is deterministic from a seed: image `i` of split `s` is generated from
`numpy.random.default_rng([seed, split_index, i])`, so any image can be regenerated on its own and changing
the number of images of a split never changes the images it already had.

Public API: `generate_scene`, `render_scene`, `describe_scene`, `generate_example`, `build_shapes`,
`shapes_folder_name`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import socket
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import NO_PERMISSION, NO_SPACE, DiskFullError
from ..files import atomic_write_bytes, atomic_write_text
from .records import SPLITS, CaptionDataset, CaptionRecord, DatasetError, SkipReport
from .scenes import COLOURS, OBJECT_VOCAB, SHAPES, SIZES, Scene, relation_between
from .vocabulary import tokenize

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Appearance and grammar of the world (its vocabulary: captioner.data.scenes)
# ----------------------------------------------------------------------------------------------------------

# Saturated, mutually distinct object colours (RGB). The background is kept near-grey, so it can never be
# mistaken for any of these.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 165, 50),
    "blue": (35, 75, 220),
    "yellow": (240, 215, 25),
    "purple": (135, 45, 185),
    "orange": (245, 125, 15),
}

# Object radius (circumscribed circle, fraction of the image size) per size class; jittered by +-10%.
SIZE_RADIUS = {"small": 0.09, "large": 0.16}
RADIUS_JITTER = 0.10
EDGE_MARGIN = 0.01  # keep a sliver between an object and the image border
MIN_GAP = 0.03  # minimum empty space between two objects' circumscribed circles
MIN_RELATION_DISTANCE = 0.2  # displacement along the dominant axis, fraction of the image size
DOMINANCE = 2.0  # dominant-axis displacement must be >= DOMINANCE x the other axis' displacement

# Caption grammar.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
OPENERS = ("", "", "", "there is ", "there is ", "an image of ", "a picture showing ", "a picture of ",
           "a photo of ", "this is ", "we can see ")
CONNECTIVES = ("and", "and", "as well as", "plus", "with")
SIZE_PROBABILITY = 0.6
MAX_CAPTION_TOKENS = 20

ANNOTATIONS = "annotations.json"
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------


def _pair_ok(a: dict, b: dict) -> bool:
    dx, dy = abs(a["x"] - b["x"]), abs(a["y"] - b["y"])
    if math.hypot(dx, dy) < a["r"] + b["r"] + MIN_GAP:
        return False
    major, minor = max(dx, dy), min(dx, dy)
    return major >= MIN_RELATION_DISTANCE and major >= DOMINANCE * minor


def generate_scene(rng: np.random.Generator) -> Scene:
    """A random scene: 1-3 objects (uniformly), distinct (colour, shape), non-overlapping, fully inside the
    image, every pair in an unambiguous spatial relation. Coordinates are fractions of the image size."""
    n = int(rng.integers(1, 4))
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    picks = rng.choice(len(combos), size=n, replace=False)
    for _ in range(100):  # size draws (three large objects are feasible but rare to place)
        attrs = []
        for k in picks:
            colour, shape = combos[int(k)]
            size = SIZES[int(rng.integers(len(SIZES)))]
            r = SIZE_RADIUS[size] * (1.0 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))
            angle = 0.0 if shape == "circle" else float(rng.uniform(0.0, 360.0))
            attrs.append({"shape": shape, "colour": colour, "size": size, "r": float(r), "angle": angle})
        for _ in range(60):  # restarts of the placement
            placed: list[dict] = []
            for obj in attrs:
                lo, hi = obj["r"] + EDGE_MARGIN, 1.0 - obj["r"] - EDGE_MARGIN
                for _ in range(60):  # tries per object
                    cand = dict(obj, x=float(rng.uniform(lo, hi)), y=float(rng.uniform(lo, hi)))
                    if all(_pair_ok(cand, p) for p in placed):
                        placed.append(cand)
                        break
                else:
                    break
            if len(placed) == n:
                objects = [{k: o[k] for k in ("shape", "colour", "size", "x", "y", "r", "angle")} for o in placed]
                relations = [[i, relation_between(objects[i], objects[j]), j]
                             for i in range(n) for j in range(n) if i != j]
                return {"objects": objects, "relations": relations}
    raise RuntimeError("could not place the scene's objects")  # pragma: no cover - not reachable in practice


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _upsample(small: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Smoothly upsample a small float32 (h, w) field to (size, size)."""
    return np.asarray(Image.fromarray(small.astype(np.float32), mode="F").resize((size, size), resample))


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-saturation texture: a smooth colour gradient, soft grey blotches and faint colour mottling."""
    grey = rng.uniform(70.0, 190.0)
    tint = rng.uniform(-10.0, 10.0, size=3)
    g = int(rng.integers(2, 4))
    lightness = rng.uniform(-30.0, 30.0, size=(g, g))
    chroma = rng.uniform(-6.0, 6.0, size=(g, g, 3))
    b = int(rng.integers(6, 16))
    blotch = rng.normal(0.0, rng.uniform(8.0, 20.0), size=(b, b))
    mottle = rng.normal(0.0, 3.0, size=(b, b, 3))
    shade = _upsample(lightness, size, Image.BILINEAR) + _upsample(blotch, size, Image.BICUBIC)
    img = np.empty((size, size, 3), np.float32)
    for c in range(3):
        img[..., c] = (shade + _upsample(chroma[..., c], size, Image.BILINEAR)
                       + _upsample(mottle[..., c], size, Image.BICUBIC))
    img += (grey + tint).astype(np.float32)
    return img


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    a0 = math.radians(angle) - math.pi / 2  # angle 0: a vertex points up
    if shape == "square":
        pts = [(r, a0 + math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        pts = [(r, a0 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        pts = [(r if k % 2 == 0 else 0.45 * r, a0 + k * math.pi / 5) for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + rad * math.cos(t), cy + rad * math.sin(t)) for rad, t in pts]


def _object_mask(obj: dict, size: int) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage in [0, 1] of an object, drawn at 2x over its bounding box; plus the box origin."""
    cx, cy, r = obj["x"] * size, obj["y"] * size, obj["r"] * size
    x0, y0 = max(int(math.floor(cx - r)) - 1, 0), max(int(math.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(math.ceil(cx + r)) + 2, size), min(int(math.ceil(cy + r)) + 2, size)
    w, h = x1 - x0, y1 - y0
    canvas = Image.new("L", (2 * w, 2 * h), 0)
    draw = ImageDraw.Draw(canvas)
    lx, ly, lr = 2 * (cx - x0), 2 * (cy - y0), 2 * r
    if obj["shape"] == "circle":
        draw.ellipse([lx - lr, ly - lr, lx + lr, ly + lr], fill=255)
    else:
        draw.polygon(_polygon(obj["shape"], lx, ly, lr, obj["angle"]), fill=255)
    mask = np.asarray(canvas.reduce(2), dtype=np.float32) * (1.0 / 255.0)
    return mask, x0, y0


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene as an RGB image of `image_size` x `image_size` pixels."""
    size = int(image_size)
    img = _background(size, rng)
    for obj in scene["objects"]:
        colour = np.asarray(COLOUR_RGB[obj["colour"]], np.float32) + rng.uniform(-12.0, 12.0, size=3).astype(np.float32)
        mask, x0, y0 = _object_mask(obj, size)
        h, w = mask.shape
        region = img[y0:y0 + h, x0:x0 + w]
        a = mask[..., None]
        region *= 1.0 - a
        region += a * colour
    img += rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(rng.uniform(3.0, 8.0))
    np.clip(img, 0.0, 255.0, out=img)
    return Image.fromarray((img + 0.5).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _mention(obj: dict, rng: np.random.Generator) -> str:
    words = ([obj["size"]] if rng.random() < SIZE_PROBABILITY else []) + [obj["colour"], obj["shape"]]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _describe_once(scene: Scene, rng: np.random.Generator) -> str:
    objs = scene["objects"]
    n = len(objs)
    opener = _choice(rng, OPENERS)
    if n == 0:
        return opener + "nothing"
    if n == 1:
        return opener + _mention(objs[0], rng)
    a, b = (int(k) for k in rng.choice(n, size=2, replace=False))
    rel = relation_between(objs[a], objs[b])  # relation of a to b; the pair is drawn in either order
    is_ = " is" if opener == "" and rng.random() < 0.3 else ""
    core = f"{_mention(objs[a], rng)}{is_} {_choice(rng, RELATION_PHRASES[rel])} {_mention(objs[b], rng)}"
    if n == 2:
        return opener + core
    c = next(k for k in range(n) if k not in (a, b))
    conn = _choice(rng, CONNECTIVES)
    if rng.random() < 0.7:
        return f"{opener}{core} {conn} {_mention(objs[c], rng)}"
    core = core.replace(" is ", " ", 1) if is_ else core
    return f"{opener}{_mention(objs[c], rng)} {conn} {core}"


def describe_scene(scene: Scene, rng: np.random.Generator) -> str:
    """One reference caption drawn from the grammar (at most MAX_CAPTION_TOKENS tokens)."""
    while True:
        text = _describe_once(scene, rng)
        if len(tokenize(text)) <= MAX_CAPTION_TOKENS:
            return text


# ----------------------------------------------------------------------------------------------------------
# Dataset generation
# ----------------------------------------------------------------------------------------------------------


def generate_example(seed: int, split: str, index: int, image_size: int = 224,
                     captions_per_image: int = 5) -> tuple[Scene, Image.Image, list[str]]:
    """Scene, image and captions of image `index` of `split`, from `default_rng([seed, split_index, index])`.

    The scene is drawn first, then two sub-seeds for rendering and captions, so the captions do not depend on
    the image size and the image does not depend on the number of captions.
    """
    scene, render_seed, captions = _draw_example(seed, split, index, captions_per_image)
    image = render_scene(scene, image_size, np.random.default_rng(render_seed))
    return scene, image, captions


def _draw_example(seed: int, split: str, index: int, captions_per_image: int) -> tuple[Scene, int, list[str]]:
    """Scene, rendering seed and captions of an example: everything but the (costly) image."""
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
    scene = generate_scene(rng)
    render_seed, caption_seed = (int(s) for s in rng.integers(0, 2**63 - 1, size=2))
    crng = np.random.default_rng(caption_seed)
    return scene, render_seed, [describe_scene(scene, crng) for _ in range(int(captions_per_image))]


def shapes_folder_name(num_train: int, num_val: int, num_test: int, seed: int, image_size: int,
                       captions_per_image: int = 5) -> str:
    name = f"shapes-s{seed}-{image_size}px-{num_train}-{num_val}-{num_test}"
    return name if captions_per_image == 5 else f"{name}-c{captions_per_image}"


def _records_from_annotations(folder: Path) -> list[CaptionRecord]:
    ann = json.loads((folder / ANNOTATIONS).read_text())
    records = []
    for item in ann["images"]:
        records.append(CaptionRecord(image=folder / item["file"], captions=list(item["captions"]),
                                     split=item["split"], key=item["file"], meta={"scene": item["scene"]}))
    order = {s: k for k, s in enumerate(SPLITS)}
    records.sort(key=lambda r: (order[r.split], r.key))
    return records


def _remove_stale_temps(folder: Path) -> None:
    """Delete temp folders of interrupted runs on this host whose process is gone (never a live one's)."""
    host = socket.gethostname()
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        parts = tmp.name.rsplit(".tmp-", 1)[-1].split("-")
        if len(parts) < 3 or "-".join(parts[:-2]) != host:
            continue
        try:
            pid = int(parts[-2])
            if pid == os.getpid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def build_shapes(root: str | Path, num_train: int = 3000, num_val: int = 300, num_test: int = 300, seed: int = 0,
                 image_size: int = 224, captions_per_image: int = 5, progress: bool = True) -> CaptionDataset:
    """Generate (or reuse) the shapes dataset under `root` and return it as a CaptionDataset.

    Generates into a temp sibling folder and renames it into place at the end, so a folder with
    annotations.json is always complete; such a folder is reused without regenerating. A reused folder is checked
    first (one lstat an image): what this builder never writes there (a symbolic link, a missing or empty image, an
    annotations.json that is a link or not ours) is damage, and is regenerated from the seed in place (a link is
    replaced, its target never touched).
    """
    counts = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
    if any(v < 0 for v in counts.values()):
        raise DatasetError(f"shapes: split sizes must be >= 0, got {counts}")
    if image_size < 16:
        raise DatasetError(f"shapes: image_size must be >= 16 pixels, got {image_size}")
    if captions_per_image < 1:
        raise DatasetError(f"shapes: captions_per_image must be >= 1, got {captions_per_image}")
    root = Path(root).expanduser().resolve()
    folder = root / shapes_folder_name(num_train, num_val, num_test, seed, image_size, captions_per_image)
    world = _World(counts, seed, image_size, captions_per_image)
    try:
        if folder.is_symlink():  # never generated through: it could point anywhere
            log.warning("shapes: %s is a symbolic link, not a folder this builder wrote: removed (the link only) "
                        "and generated again", folder)
            folder.unlink()
        if folder.is_dir() and (folder / ANNOTATIONS).is_symlink() or _is_regular(folder / ANNOTATIONS):
            _repair(folder, world)
        else:
            _generate(root, folder, world, progress)
    except OSError as e:
        if isinstance(e, DiskFullError) or e.errno in NO_SPACE:
            why = f"{e.filename}: {e.strerror}" if e.errno else str(e).split(" (", 1)[0]
            raise DiskFullError(f"{folder}: the shapes world could not be written ({why}); nothing half-written was "
                                "left. Free space on that disk, or generate it elsewhere (data.root=... or "
                                "paths.data_dir=...), and run the same command again") from None
        if e.errno in NO_PERMISSION:
            raise DatasetError(f"{e.filename or folder}: cannot write the shapes world there ({e.strerror}). Make "
                               f"{root} writable, or point data.root=... (or paths.data_dir=...) at a directory you "
                               "can write") from None
        raise
    records = _records_from_annotations(folder)
    return CaptionDataset(name="shapes", root=folder, records=records, skipped=SkipReport("shapes"))


@dataclass(frozen=True)
class _World:
    """The parameters that determine every file of a shapes folder."""

    counts: dict
    seed: int
    image_size: int
    captions_per_image: int

    def items(self) -> Iterable[tuple[str, int, str]]:
        """(split, index, file relative to the folder) of every image."""
        for split in SPLITS:
            for i in range(self.counts[split]):
                yield split, i, f"images/{split}_{i:06d}.jpg"

    def jpeg(self, split: str, index: int) -> bytes:
        _, image, _ = generate_example(self.seed, split, index, self.image_size, self.captions_per_image)
        return _jpeg_bytes(image)

    def annotations(self, items: list[dict]) -> str:
        return json.dumps({
            "name": "shapes",
            "version": FORMAT_VERSION,
            "seed": self.seed,
            "image_size": self.image_size,
            "captions_per_image": self.captions_per_image,
            "counts": self.counts,
            "vocab": {k: list(v) for k, v in OBJECT_VOCAB.items()},
            "images": items,
        })


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _is_regular(path: Path) -> bool:
    """A plain file, not a link (lstat: a link is never followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` with `data`; never through a link, never over an existing file (O_EXCL | O_NOFOLLOW)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _generate(root: Path, folder: Path, world: _World, progress: bool) -> None:
    """Generate the whole folder into a temp sibling and rename it into place."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    tmp = root / f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate_into(tmp, world, progress)
        if folder.exists() and not _is_regular(folder / ANNOTATIONS):
            shutil.rmtree(folder)  # an incomplete folder (not written by us): replace it
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_regular(folder / ANNOTATIONS):  # not a concurrent build that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _generate_into(tmp: Path, world: _World, progress: bool) -> None:
    from tqdm.auto import tqdm

    (tmp / "images").mkdir(parents=True)
    items = []
    total = sum(world.counts.values())
    with tqdm(total=total, unit="img", desc=f"shapes: generating {total} images", disable=not progress) as bar:
        for split, i, rel in world.items():
            scene, image, captions = generate_example(world.seed, split, i, world.image_size,
                                                      world.captions_per_image)
            _write_new(tmp / rel, _jpeg_bytes(image))
            items.append({"file": rel, "split": split, "index": i, "scene": scene, "captions": captions})
            bar.update(1)
    atomic_write_text(tmp / ANNOTATIONS, world.annotations(items))  # last: its presence means complete


def _repair(folder: Path, world: _World) -> None:
    """Regenerate, in place, whatever of a reused folder is not as this builder wrote it."""
    images = folder / "images"
    if images.is_symlink() or (images.exists() and not images.is_dir()):
        images.unlink()  # a link to a folder elsewhere: the images would be written there
    images.mkdir(exist_ok=True)
    damaged = [(split, i, rel) for split, i, rel in world.items() if not _intact_image(folder / rel)]
    for split, i, rel in damaged:
        atomic_write_bytes(folder / rel, world.jpeg(split, i))  # replaces a link; its target is never opened
    annotations_damaged = not _annotations_intact(folder, world)
    if annotations_damaged:
        items = [{"file": rel, "split": split, "index": i, "scene": scene, "captions": captions}
                 for split, i, rel in world.items()
                 for scene, _, captions in [_draw_example(world.seed, split, i, world.captions_per_image)]]
        atomic_write_text(folder / ANNOTATIONS, world.annotations(items))
    if damaged or annotations_damaged:
        what = ", ".join(rel for _, _, rel in damaged[:5]) + (" ..." if len(damaged) > 5 else "")
        log.warning("shapes: %s was damaged (symbolic links, missing or empty files): regenerated %d image(s)%s%s",
                    folder, len(damaged), f" ({what})" if damaged else "",
                    f" and {ANNOTATIONS}" if annotations_damaged else "")


def _intact_image(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def _annotations_intact(folder: Path, world: _World) -> bool:
    """A plain annotations.json of this world's images, in order (the file names are checked, so a planted file
    can never point the dataset outside its folder)."""
    if not _is_regular(folder / ANNOTATIONS):
        return False
    try:
        items = json.loads((folder / ANNOTATIONS).read_text())["images"]
        return [(item["split"], item["file"]) for item in items] == [(s, rel) for s, _, rel in world.items()] and all(
            isinstance(item["captions"], list) and isinstance(item["scene"], dict) for item in items)
    except (OSError, ValueError, KeyError, TypeError):
        return False
