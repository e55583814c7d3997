"""LightningDataModule over cached encoder features and tokenized captions.

- train: one sample per (image, caption) pair, the image's features read from the memory-mapped cache (or, with
  `train_batches="images"`, each image once with all its references: self-critical training samples its own
  captions and rewards them against the references);
- val/test: each image once, with ALL its references grouped (turning 5 references into 5 single-reference
  rows would turn multi-reference BLEU into single-reference BLEU, a classic evaluation bug).
Captions are tokenized once in `setup`, into one padded int array; batches are fetched with `__getitems__`
(one fancy-indexed read of the memmap per batch, not one per sample) and trimmed to their longest caption.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..encoders import EncoderSpec
from ..features import ExtractionGroup, FeatureCache, prepare_features, worker_context
from . import dataset_id, load_dataset
from .records import SPLITS, CaptionDataset, CaptionRecord, DatasetError
from .vocabulary import Vocabulary, build_vocabulary, encode_captions, tokenize

log = logging.getLogger(__name__)


def _batch_identity(batch):
    return batch


class _FeatureRows:
    """Reads rows of one split's features (pooled or spatial) as float32, by positioned reads from the cache's .npy.

    Not through the memory map: every page of a map that training touches stays in the process's resident set, so
    peak RSS would grow with the dataset (measured: the benchmark's 10x-images epoch). Read into a fresh buffer,
    the file's pages live in the kernel's page cache, shared and reclaimable, and RSS stays flat. Rows are read in
    file order, runs of consecutive rows in one call. The file is opened lazily per process (DataLoader workers
    get their own descriptor after fork or spawn).
    """

    def __init__(self, cache: FeatureCache, feature: str) -> None:
        array = cache.spatial if feature == "spatial" else cache.pooled
        if array is None:
            raise ValueError(f"feature cache {cache.path} has no spatial tokens; rebuild it with spatial features")
        self.path, self.offset = str(array.filename), int(array.offset)
        self.row_shape, self.dtype, self.n = tuple(array.shape[1:]), array.dtype, int(array.shape[0])
        self.row_bytes = int(np.prod(self.row_shape)) * array.dtype.itemsize
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}  # a descriptor does not travel to another process

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.read(rows).astype(np.float32))

    @property
    def nbytes(self) -> int:
        return self.n * self.row_bytes

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows as stored (float16)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"feature rows {rows.min()}..{rows.max()} out of range for {self.n} rows in {self.path}")
        order = np.argsort(rows, kind="stable")
        buf = np.empty((len(rows),) + self.row_shape, dtype=self.dtype)
        fd, i = self._file(), 0
        while i < len(order):  # one read per run of consecutive rows (in file order)
            j = i + 1
            while j < len(order) and rows[order[j]] == rows[order[j - 1]] + 1 and order[j] == order[j - 1] + 1:
                j += 1
            want = (j - i) * self.row_bytes
            got = os.preadv(fd, [memoryview(buf[order[i]:order[i] + (j - i)]).cast("B")],
                            self.offset + int(rows[order[i]]) * self.row_bytes)
            if got != want:
                raise OSError(f"short read from {self.path} ({got} of {want} bytes at row {rows[order[i]]}): the "
                              "feature cache was truncated while in use; run again to repair it")
            i = j
        return buf


class ResidentRows:
    """One split's features in one tensor on a device (RAM on the CPU), as stored (float16). A batch is one gather
    on the device: no reads, no host-to-device copy per batch."""

    CHUNK_BYTES = 256 << 20

    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.device, self.n = data, data.device, len(data)

    @classmethod
    def load(cls, reader: _FeatureRows, device: torch.device) -> "ResidentRows":
        """The reader's rows on `device`, filled chunk by chunk: the host never holds a second whole copy."""
        data = torch.empty((reader.n, *reader.row_shape), dtype=torch.float16, device=torch.device(device))
        step = max(1, cls.CHUNK_BYTES // max(1, reader.row_bytes))
        for a in range(0, reader.n, step):
            rows = np.arange(a, min(a + step, reader.n))
            data[a:a + len(rows)].copy_(torch.from_numpy(reader.read(rows).astype(np.float16, copy=False)))
        return cls(data)

    def __call__(self, rows) -> torch.Tensor:
        index = torch.as_tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        return self.data[index].float()


class _RowBatches(Dataset):
    """A dataset over `self.rows` whose batches are built at once by `__getitems__` (one memmap read a batch)."""

    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])

    def __getitems__(self, indices) -> dict:
        raise NotImplementedError


class CaptionPairs(_RowBatches):
    """(image features, caption) training pairs: one sample per caption.

    A batch carries each distinct image's features once (`features`, (U, ...)) and `caption_image` (B,) maps each
    caption to its image, so a decoder with an expensive image encoder (the transformer) encodes an image once
    however many of its captions are in the batch; `GroupedBatches` puts all captions of an image together.
    """

    def __init__(self, features: _FeatureRows, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.features, self.rows, self.tokens, self.lengths = features, rows, tokens, lengths

    def __getitems__(self, indices) -> dict:
        idx, images, caption_image, longest = caption_batch(self.rows, self.lengths, indices)
        return {
            "features": self.features(images),
            "captions": torch.from_numpy(self.tokens[idx, :longest].astype(np.int64)),
            "lengths": torch.from_numpy(self.lengths[idx].astype(np.int64)),
            "caption_image": torch.from_numpy(caption_image),
            "image_rows": torch.from_numpy(images),  # cache row of each distinct image (U,)
        }


def caption_batch(rows: np.ndarray, lengths: np.ndarray, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A batch of training captions laid out: (their indices, the distinct cache rows of their images, each
    caption's image among those, the longest caption's tokens), all int64."""
    idx = np.asarray(indices, dtype=np.int64)
    images, caption_image = np.unique(rows[idx], return_inverse=True)
    return idx, images, caption_image.reshape(-1).astype(np.int64), int(lengths[idx].max())


class GroupedBatches(Sampler[list[int]]):
    """Shuffled training batches of about `batch_size` captions, each made of whole groups, every caption once an
    epoch. A group is an image's captions (`by_image`, as ImageCaptioning.pytorch's seq_per_img: the image encoder
    of an attention decoder then runs once per image instead of once per caption, ≈5x less work) or one caption.

    With `lengths` (tokens of each caption), batches are also grouped by length, as Hugging Face's
    `group_by_length` and fairseq's buckets: the shuffled groups are cut into pools of `pool` batches, each pool is
    sorted by its groups' longest caption, cut into batches, and the batches of the epoch are shuffled again. A
    batch is padded to its longest caption, so this cuts the padding; on the shapes world (captions of 8-30 tokens)
    from 39 % to 13 % of a batch's tokens with whole images, to ~2 % with single captions; the captions of an
    image tend to be of similar length.

    Under DDP (`num_replicas` > 1) every rank draws the same shuffled batches (same seed and epoch) and takes every
    `num_replicas`-th one, from `rank` on; the list is first padded with its own first batches to a multiple of
    `num_replicas`, so all ranks run the same number of steps (DDP's gradient all-reduce needs that)."""

    def __init__(self, pair_rows: np.ndarray, batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, lengths: np.ndarray | None = None, by_image: bool = True, pool: int = 50) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.batch_size, self.seed, self.epoch, self.pool = batch_size, seed, 0, pool
        self.num_replicas, self.rank = num_replicas, rank
        if by_image:
            order = np.argsort(pair_rows, kind="stable")
            self.groups = np.split(order, np.flatnonzero(np.diff(pair_rows[order])) + 1)
        else:
            self.groups = [np.array([i]) for i in range(len(pair_rows))]
        self.group_lengths = None if lengths is None else np.array([lengths[g].max() for g in self.groups])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _group_order(self, rng: np.random.Generator) -> np.ndarray:
        order = rng.permutation(len(self.groups))
        if self.group_lengths is None:
            return order
        per_pool = max(1, round(self.pool * self.batch_size * len(self.groups) / sum(map(len, self.groups))))
        pools = [order[i:i + per_pool] for i in range(0, len(order), per_pool)]
        # stable sort, longest first: ties keep their shuffled order
        return np.concatenate([p[np.argsort(-self.group_lengths[p], kind="stable")] for p in pools])

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches, current = [], []
        for g in self._group_order(rng):
            current.extend(self.groups[g].tolist())
            if len(current) >= self.batch_size:
                batches.append(current)
                current = []
        if current:
            batches.append(current)
        if self.group_lengths is not None:  # long and short batches take turns through the epoch
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.num_replicas > 1:
            padding = -len(batches) % self.num_replicas
            batches = (batches + batches[:padding])[self.rank::self.num_replicas]
        return batches

    def __iter__(self):
        batches = self._batches()
        self.epoch += 1  # a new shuffle every epoch even when nobody calls set_epoch
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches())


class ResidentBatches:
    """The training batches of `sampler` (GroupedBatches: the same batches, in the same order, as the DataLoader
    path) built on the features' device from resident features and tokens: per epoch one host-to-device copy of
    every batch's indices, then per batch only gathers on the device and no host sync. Not a DataLoader: there is
    nothing to load. `batch_sampler` is how Lightning finds `set_epoch` (a resumed run's shuffle)."""

    def __init__(self, features: ResidentRows, pairs: "CaptionPairs", sampler: GroupedBatches) -> None:
        self.features, self.pairs, self.batch_sampler = features, pairs, sampler
        device = features.device
        self.tokens = torch.from_numpy(pairs.tokens.astype(np.int64)).to(device)
        self.lengths = torch.from_numpy(pairs.lengths.astype(np.int64)).to(device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        # the draw a DataLoader's iterator makes for its workers' base seed: the same dropout masks then follow, and
        # a run trains the same model bit for bit with or without resident features
        torch.empty((), dtype=torch.int64).random_()
        batches = list(self.batch_sampler)
        # every batch's captions, its distinct images and each caption's image among them, laid end to end
        plan, parts = [], []
        for batch in batches:
            idx, images, caption_image, longest = caption_batch(self.pairs.rows, self.pairs.lengths, batch)
            plan.append((len(idx), len(images), longest))
            parts += [idx, images, caption_image]
        flat = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64)).to(self.features.device)
        pos = 0
        for n, u, longest in plan:
            idx, images, caption_image = flat[pos:pos + n], flat[pos + n:pos + n + u], flat[pos + n + u:pos + 2 * n + u]
            pos += 2 * n + u
            yield {"features": self.features(images), "captions": self.tokens[idx, :longest],
                   "lengths": self.lengths[idx], "caption_image": caption_image, "image_rows": images}


class CaptionImages(_RowBatches):
    """Each image once, with all of its references as written (for BLEU/CIDEr against every reference; the metrics
    tokenise them as the official evaluation does)."""

    def __init__(self, features: _FeatureRows, rows: np.ndarray, records: list[CaptionRecord],
                 vocab: Vocabulary, max_length: int) -> None:
        self.features, self.rows, self.records = features, rows, records
        self.references = [list(r.captions) for r in records]
        # token ids of every reference, for the validation loss (teacher forcing on all references)
        self.reference_ids = [encode_captions(vocab, r.captions, max_length)[0] for r in records]

    def __getitems__(self, indices) -> dict:
        idx = np.asarray(indices, dtype=np.int64)
        ids = [(j, x) for j, i in enumerate(idx) for x in self.reference_ids[i]]
        captions = torch.zeros(len(ids), max(len(x) for _, x in ids), dtype=torch.long)
        for row, (_, x) in enumerate(ids):
            captions[row, : len(x)] = torch.tensor(x)
        return {
            "features": self.features(self.rows[idx]),
            "index": torch.from_numpy(idx),
            "references": [self.references[i] for i in idx],
            "captions": captions,
            "caption_image": torch.tensor([j for j, _ in ids], dtype=torch.long),
        }


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: a GPU's free memory, or the RAM the kernel says is available."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resolved_extraction(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Feature extraction settings (`features.*`) with `auto` device, workers and decode path resolved for this
    machine."""
    from ..config import resolve_decode, resolve_device, resolve_extraction_workers

    out = dict(settings)
    if "device" in out:
        out["device"] = resolve_device(out["device"])
    if "num_workers" in out:
        out["num_workers"] = resolve_extraction_workers(out["num_workers"], out.get("device", "cpu"))
    if "decode" in out:
        out["decode"] = resolve_decode(out["decode"], out.get("device", "cpu"))
    return out


class CaptionDataModule(L.LightningDataModule):
    def __init__(
        self,
        data: Mapping[str, Any],
        encoder: Mapping[str, Any],
        cache_dir: str,
        feature: str = "pooled",
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        min_word_count: int = 5,
        max_length: int = 30,
        extraction: Mapping[str, Any] | None = None,
        vocab: Vocabulary | None = None,
        progress: bool = True,
        group_by_image: bool = True,
        group_by_length: bool = True,
        seed: int = 0,
        test_split: str = "test",
        train_batches: str = "captions",
        resident: bool | str = "auto",
        resident_budget: float = 0.5,
    ) -> None:
        super().__init__()
        if feature not in ("pooled", "spatial"):
            raise ValueError(f"feature must be 'pooled' or 'spatial' (the model family's), got '{feature}'")
        self.data_cfg, self.encoder_spec = dict(data), EncoderSpec.from_config(encoder)
        self.cache_dir, self.feature = Path(str(cache_dir)).expanduser(), feature
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.min_word_count, self.max_length = min_word_count, max_length
        self.extraction = resolved_extraction(extraction or {})
        self.vocab, self.progress = vocab, progress
        self.group_by_image, self.group_by_length, self.seed = group_by_image, group_by_length, seed
        if test_split not in ("val", "test"):
            raise ValueError(f"test_split must be 'val' or 'test' (config key split), got '{test_split}'")
        self.test_split = test_split  # what `trainer.test` evaluates (eval.py can point it at val)
        if train_batches not in ("captions", "images"):
            raise ValueError(f"train_batches must be 'captions' or 'images', got '{train_batches}'")
        self.train_batches = train_batches
        if resident not in ("auto", True, False):
            raise ValueError(f"resident must be auto, true or false (config key loader.resident), got {resident!r}")
        self.resident, self.resident_budget = resident, resident_budget
        self.resident_rows: dict[str, ResidentRows] = {}
        self._resident_left: float | None = None  # bytes the budget still allows, once the first split is loaded
        self.dataset: CaptionDataset | None = None
        self.caches: dict[str, FeatureCache] = {}
        self.splits: dict[str, Dataset] = {}
        self.records: dict[str, list[CaptionRecord]] = {}
        self.stats: dict[str, Any] = {}

    # -- building ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate/read the dataset (Lightning calls this on one process per node). Features are prepared in
        `setup`, which knows the stage: training reads all three splits, an evaluation only the one it scores, so
        a dataset that lacks a split the stage needs is refused before anything is extracted."""
        self._dataset()

    def _dataset(self) -> CaptionDataset:
        if self.dataset is None:
            self.dataset = load_dataset(self.data_cfg, progress=self.progress)
            if self.dataset.skipped.total:
                log.warning(self.dataset.skipped.summary())
        return self.dataset

    def _load(self, splits: tuple[str, ...]) -> None:
        """Open (building as needed) the feature caches of `splits`; every DDP rank shares a build."""
        missing = [s for s in splits if s not in self.caches]
        if not missing:
            return
        dataset = self._dataset()
        self.caches.update(prepare_features(
            {s: dataset.split(s) for s in missing}, self.encoder_spec, self.cache_dir, dataset_id(dataset),
            spatial=self.feature == "spatial", progress=self.progress, group=ExtractionGroup.from_torch_distributed(),
            **self.extraction))

    def _splits_for(self, stage: str | None) -> tuple[str, ...]:
        """The splits a stage reads: fitting all three (val picks the checkpoint, test scores it at the end), an
        evaluation its own split, plus train while there is no vocabulary to build the captions' ids with."""
        if stage in ("test", "predict"):
            needed = (self.test_split,)
        elif stage == "validate":
            needed = ("val",)
        else:
            return SPLITS
        return needed if self.vocab is not None else ("train", *needed)

    def setup(self, stage: str | None = None) -> None:
        splits = self._splits_for(stage)
        if all(s in self.splits for s in splits):
            return
        dataset = self._dataset()
        self._refuse_empty_splits(splits, {s: len(dataset.split(s)) for s in SPLITS}, stage)
        if self.vocab is None:  # a min_word_count that cannot work is refused before any extraction
            build_vocabulary((c for r in dataset.split("train") for c in r.captions), self.min_word_count)
        self._load(splits)
        for split in splits:
            cache = self.caches[split]
            self.records[split] = [r for r in dataset.split(split) if r.key not in cache.failed]
            self.stats[f"{split}_unreadable_images"] = len(cache.failed)
        self._refuse_empty_splits(splits, {s: len(r) for s, r in self.records.items()}, stage, after_skips=True)
        if self.vocab is None:
            self.vocab = build_vocabulary((c for r in self.records["train"] for c in r.captions), self.min_word_count)
        feats = {s: _FeatureRows(self.caches[s], self.feature) for s in splits}
        if "train" in splits and self.train_batches == "captions":
            self.splits["train"] = self._training_pairs(feats["train"])
        for split in ("train", "val", "test") if self.train_batches == "images" else ("val", "test"):
            if split in splits:
                self.splits[split] = CaptionImages(feats[split], self._rows(split), self.records[split], self.vocab,
                                                   self.max_length)

    def _training_pairs(self, features: _FeatureRows) -> CaptionPairs:
        """One row per training caption, tokenized once into a padded array."""
        train = self.records["train"]
        captions = [c for r in train for c in r.captions]
        ids, truncated = encode_captions(self.vocab, captions, self.max_length)
        self.stats["truncated_train_captions"] = truncated
        if truncated:
            log.info("%d of %d training captions truncated to %d tokens (data.max_length)", truncated,
                     len(captions), self.max_length)
        tokens = np.zeros((len(ids), self.max_length + 2), dtype=np.int32)
        lengths = np.array([len(x) for x in ids], dtype=np.int32)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = x
        pair_rows = np.repeat(self._rows("train"), [len(r.captions) for r in train])
        return CaptionPairs(features, pair_rows, tokens, lengths)

    # -- refusing a dataset the stage cannot use ----------------------------------------------------------
    def _refuse_empty_splits(self, splits: tuple[str, ...], counts: dict[str, int], stage: str | None,
                             after_skips: bool = False) -> None:
        """DatasetError when a split the stage reads has no (usable) image: naming the split, every split's
        images, and the fix for this dataset's format. Without it training would crash at its end (no val/bleu_4
        to stop early on, no test score) or evaluate nothing."""
        empty = [s for s in splits if not counts.get(s)]
        if not empty:
            return
        dataset = self._dataset()
        sizes = ", ".join(f"{s} {counts.get(s, len(dataset.split(s)))}" for s in SPLITS)
        names = " and ".join(empty)
        problem = (f"dataset {dataset.name} ({dataset.root}): the {names} split{'s have' if len(empty) > 1 else ' has'}"
                   f" no usable image ({sizes} images)")
        if after_skips:
            problem += ": " + "; ".join(f"all {len(dataset.split(s))} image(s) of {s} could not be read (first: "
                                        f"{next(iter(self.caches[s].failed.values()), '?')})" for s in empty)
            fix = "Fix or replace those images (the warning above lists them); a fixed image is used by the next run"
        else:
            fix = self._split_fix(dataset, empty)
        if stage in ("test", "predict", "validate"):
            scored = splits[-1]
            need = f"This evaluation scores the {scored} split (split={scored})" + (
                ", and builds its vocabulary from train's captions" if "train" in splits else "")
            fix += "; or evaluate another split (split=val or split=test)"
        else:
            need = "Training needs images in all three splits (val picks the best checkpoint, test scores it)"
        raise DatasetError(f"{problem}. {need}. {fix}")

    def _split_fix(self, dataset: CaptionDataset, empty: list[str]) -> str:
        """What gives the `empty` splits images, in this dataset format's own terms."""
        fmt, reader = dataset.name, dict(self.data_cfg.get("reader") or {})
        if fmt == "shapes":
            return "Set " + " and ".join(f"data.num_{s}" for s in empty) + " to 1 or more"
        if fmt == "csv":
            file = Path(dataset.root) / str(reader.get("file", "captions.csv"))
            return ("Add rows with " + " and ".join(f"split={s}" for s in empty) + f" to {file}, or leave the split "
                    "column out (or empty for some images) so that those images get a seeded 80/10/10 split "
                    "(data.split_seed)")
        if fmt == "flickr8k" or (fmt == "flickr8k_csv" and reader.get("split_files")):
            return ("List images in the split file of " + " and ".join(empty) + " (data.reader.split_files), and "
                    "check that they are in the caption file")
        if fmt == "karpathy":
            return (f'Give images "split": "{empty[0]}" in {Path(dataset.root) / str(reader.get("json_file", ""))}'
                    " (data.reader.json_file)")
        if fmt == "coco" and "train" not in empty:
            return "val and test are the two halves of val2017: check data.reader.val_json and its images"
        return ("A seeded split gives each split images once the dataset has 3 or more usable images: check "
                "data.root and the skip summary above")

    def _rows(self, split: str) -> np.ndarray:
        row_of = self.caches[split].row()
        return np.array([row_of[r.key] for r in self.records[split]], dtype=np.int64)

    # -- properties the models need -----------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return next(iter(self.caches.values())).dim  # every split's cache comes from the same encoder

    @property
    def grid(self) -> tuple[int, int]:
        return next(iter(self.caches.values())).grid

    def scenes(self, split: str) -> list[dict] | None:
        """Shapes-world scenes of a split, in dataset order (None for real datasets)."""
        recs = self.records[split]
        return [r.meta["scene"] for r in recs] if recs and "scene" in recs[0].meta else None

    def caption_lengths(self, split: str = "train") -> np.ndarray:
        return np.array([len(tokenize(c)) for r in self.records[split] for c in r.captions])

    # -- loaders ------------------------------------------------------------------------------------------
    # Under DDP the loaders shard the data themselves (the trainer runs with use_distributed_sampler=False, since
    # Lightning cannot inject a sampler into GroupedBatches): training batches by GroupedBatches' rank
    # slice, or a shuffled DistributedSampler; val/test by a DistributedSampler that pads the last shard with
    # repeated images, which the model drops again after gathering the outputs of all ranks.
    def _replicas(self) -> tuple[int, int]:
        """(world size, global rank) of the trainer this DataModule is attached to; (1, 0) without DDP."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        world, rank = self._replicas()
        resident = self._resident_features(split) is not None
        # resident features are gathered in this process (a worker cannot use the GPU's copy); pinned host batches
        # reach a GPU without the copy blocking the host
        workers = 0 if resident else self.num_workers
        options = dict(num_workers=workers, collate_fn=_batch_identity, persistent_workers=workers > 0,
                       pin_memory=not resident and self._device().type == "cuda",
                       multiprocessing_context=worker_context(workers))
        if world > 1:
            sampler = DistributedSampler(self.splits[split], num_replicas=world, rank=rank, shuffle=shuffle,
                                         seed=self.seed, drop_last=False)
            return DataLoader(self.splits[split], batch_size=batch_size, sampler=sampler, **options)
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle, **options)

    def train_dataloader(self):
        if self.train_batches == "images":  # batch_size images, shuffled; under DDP each rank its own images
            return self._loader("train", self.batch_size, shuffle=True)
        resident = self._resident_features("train")
        pairs = self.splits["train"]  # neither grouping: GroupedBatches shuffles single captions
        world, rank = self._replicas()
        sampler = GroupedBatches(pairs.rows, self.batch_size, self.seed, num_replicas=world, rank=rank,
                                 lengths=pairs.lengths if self.group_by_length else None, by_image=self.group_by_image)
        if resident is not None:
            return ResidentBatches(resident, pairs, sampler)
        return DataLoader(pairs, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=_batch_identity,
                          persistent_workers=self.num_workers > 0, pin_memory=self._device().type == "cuda",
                          multiprocessing_context=worker_context(self.num_workers))

    # -- resident features --------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        """The device the attached trainer trains on (this rank's GPU under DDP); the CPU without a trainer."""
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _resident_features(self, split: str) -> ResidentRows | None:
        """The split's features held on the training device (`loader.resident`), loaded on first use, or None:
        `auto` holds them on a GPU while all the splits loaded so far fit `resident_budget` of the memory that was
        free when the first one was loaded, and reads them per batch from the cache otherwise (on the CPU the
        page cache already serves those reads, and RSS stays flat: benchmark.py's rss_ratio_10x); `true` holds
        them on any device, and refuses a split that does not fit."""
        if split in self.resident_rows:
            return self.resident_rows[split]
        device = self._device()
        if self.resident is False or (self.resident == "auto" and device.type != "cuda"):
            return None
        dataset = self.splits[split]
        need = dataset.features.nbytes
        if self._resident_left is None:
            self._resident_left = self.resident_budget * free_memory(device)
        if need > self._resident_left:
            problem = (f"the {split} features ({need / 2**30:.2f} GiB) do not fit what is left of "
                       f"loader.resident_budget={self.resident_budget} of the free memory of {device} "
                       f"({self._resident_left / 2**30:.2f} GiB)")
            if self.resident is True:
                raise DatasetError(f"{problem}. Raise loader.resident_budget, or set loader.resident=auto to read "
                                   "the splits that do not fit from the cache")
            log.info("%s: read per batch from the cache", problem)
            return None
        self._resident_left -= need
        rows = ResidentRows.load(dataset.features, device)
        dataset.features = rows  # val/test batches gather from it too
        self.resident_rows[split] = rows
        log.info("%s features resident on %s (%.2f GiB)", split, device, need / 2**30)
        return rows

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, self.eval_batch_size, shuffle=False)
