"""DataModule: pairs for training, grouped references for evaluation, padding handled in the batch."""

import numpy as np
import pytest
import torch

from captioner.data.datamodule import CaptionDataModule
from captioner.data.vocabulary import normalize

DATA = {"name": "shapes", "root": None, "reader": {"_target_": "captioner.data.shapes.build_shapes", "_partial_": True,
                                                    "num_train": 60, "num_val": 20, "num_test": 20, "seed": 3}}
ENCODER = {"name": "efficientnet_lite0", "weights": "package", "input_size": 224, "crop_pct": 1.0}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One feature cache for the file's tests: they read it, none of them tests how it is built."""
    return tmp_path_factory.mktemp("cache")


def make(tiny_shapes, cache_dir, feature="pooled", **kw):
    data = dict(DATA, root=str(tiny_shapes.root.parent))  # reuses the session's generated world
    dm = CaptionDataModule(data, ENCODER, cache_dir=str(cache_dir), feature=feature, batch_size=16,
                           eval_batch_size=8, min_word_count=1, progress=False,
                           extraction={"num_workers": 0}, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_training_pairs_one_per_caption_and_padded_batches(tiny_shapes, cache_dir):
    dm = make(tiny_shapes, cache_dir)
    assert len(dm.splits["train"]) == 60 * 5
    batch = next(iter(dm.train_dataloader()))
    caps, lengths = batch["captions"], batch["lengths"]
    # whole images: 4 images x 5 captions >= batch_size 16; each image's features once
    assert batch["features"].dtype == torch.float32 and batch["features"].shape == (4, 1280)
    assert len(caps) == 20 and torch.bincount(batch["caption_image"]).tolist() == [5] * 4
    assert caps.shape == (20, int(lengths.max()))
    for row, n in zip(caps, lengths):
        assert row[0] == dm.vocab.sos_id and row[n - 1] == dm.vocab.eos_id and (row[n:] == 0).all()
    # a pair's caption belongs to the image whose features come with it
    pairs = dm.splits["train"]
    item = pairs.__getitems__([7])
    rec = dm.records["train"][7 // 5]
    assert dm.vocab.decode(item["captions"][0].tolist()) == normalize(rec.captions[7 % 5])
    np.testing.assert_allclose(item["features"][0].numpy(), dm.caches["train"].pooled[pairs.rows[7]].astype(np.float32))


def test_eval_splits_iterate_images_once_with_all_references(tiny_shapes, cache_dir):
    dm = make(tiny_shapes, cache_dir, feature="spatial")
    batches = list(dm.val_dataloader())
    assert sum(len(b["references"]) for b in batches) == 20
    assert batches[0]["features"].shape == (8, 49, 1280)
    assert all(len(refs) == 5 for b in batches for refs in b["references"])
    assert batches[0]["references"][2] == dm.records["val"][2].captions  # as written: the metrics tokenise them
    assert dm.grid == (7, 7) and dm.feature_dim == 1280
    assert dm.scenes("test")[0]["objects"]


def test_vocabulary_comes_from_train_split_only(tiny_shapes, cache_dir):
    dm = make(tiny_shapes, cache_dir)
    train_words = {w for r in dm.records["train"] for c in r.captions for w in normalize(c).split()}
    assert set(dm.vocab.itos[4:]) <= train_words


def test_grouped_batches_hold_whole_images_and_every_caption_once(tiny_shapes, cache_dir):
    from captioner.data.datamodule import GroupedBatches

    dm = make(tiny_shapes, cache_dir)
    pairs = dm.splits["train"]
    sampler = GroupedBatches(pairs.rows, batch_size=16, seed=0)
    first = list(sampler)
    flat = [i for b in first for i in b]
    assert sorted(flat) == list(range(len(pairs)))  # every caption exactly once per epoch
    for b in first:
        images = pairs.rows[b]
        for image in set(images.tolist()):  # whole images: all 5 captions of an image in the same batch
            assert (images == image).sum() == 5
    assert [i for b in list(sampler) for i in b] != flat  # a new shuffle next epoch
    batch = pairs.__getitems__(first[0])
    assert batch["features"].shape[0] == len(set(pairs.rows[first[0]].tolist()))  # each image's features once
    assert batch["caption_image"].max() == batch["features"].shape[0] - 1


def _padding(batches, lengths) -> float:
    """Share of a padded epoch's tokens that are padding (each batch padded to its longest caption)."""
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - sum(lengths[b].sum() for b in batches) / padded


def test_length_grouping_cuts_padding_and_keeps_every_caption_and_whole_images():
    from captioner.data.datamodule import GroupedBatches

    rng = np.random.default_rng(0)
    pair_rows = np.repeat(rng.permutation(400), 5)  # 400 images, 5 captions each, in no particular order
    lengths = np.clip(rng.integers(8, 24, 400)[pair_rows] + rng.integers(-3, 4, pair_rows.size), 3, 30)
    plain = list(GroupedBatches(pair_rows, 64, seed=0))
    grouped_sampler = GroupedBatches(pair_rows, 64, seed=0, lengths=lengths)
    grouped = list(grouped_sampler)
    assert sorted(i for b in grouped for i in b) == list(range(pair_rows.size))  # every caption once
    for b in grouped:  # still whole images
        images, counts = np.unique(pair_rows[b], return_counts=True)
        assert (counts == 5).all()
    assert _padding(grouped, lengths) < 0.5 * _padding(plain, lengths)
    longest = [lengths[b].max() for b in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # batch order is shuffled
    assert [i for b in grouped_sampler for i in b] != [i for b in grouped for i in b]  # a new draw each epoch
    # single captions (loader.group_by_image=false): batches of exactly batch_size, almost no padding
    singles = list(GroupedBatches(pair_rows, 64, seed=0, lengths=lengths, by_image=False))
    assert sorted(i for b in singles for i in b) == list(range(pair_rows.size))
    assert sorted(len(b) for b in singles)[1:] == [64] * (len(singles) - 1)
    assert _padding(singles, lengths) < _padding(grouped, lengths)


@pytest.mark.parametrize("feature", ["pooled", "spatial"])
@pytest.mark.parametrize("by_image,by_length", [(True, True), (False, False)])
def test_resident_batches_equal_the_loader_batches(tiny_shapes, cache_dir, feature, by_image, by_length):
    """loader.resident builds the same batches, in the same order, with the same values, as the DataLoader over the
    cache, every epoch; only without the per-batch reads and copies."""
    kw = dict(feature=feature, group_by_image=by_image, group_by_length=by_length)
    read, held = make(tiny_shapes, cache_dir, resident=False, **kw), make(tiny_shapes, cache_dir, resident=True, **kw)
    from captioner.data.datamodule import ResidentBatches

    loader, resident = read.train_dataloader(), held.train_dataloader()
    assert isinstance(resident, ResidentBatches) and not isinstance(loader, ResidentBatches)
    assert held.resident_rows["train"].data.dtype == torch.float16  # held as cached: half the memory of float32
    for epoch in range(2):  # a new shuffle each epoch, the same on both sides
        a, b = list(loader), list(resident)
        assert len(a) == len(b) == len(resident) > 1
        for x, y in zip(a, b):
            assert x.keys() <= y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]), (epoch, key)
    # validation batches gather from the resident tensor too
    for x, y in zip(read.val_dataloader(), held.val_dataloader()):
        assert torch.equal(x["features"], y["features"]) and x["references"] == y["references"]


def test_resident_auto_reads_from_the_cache_on_cpu_and_true_refuses_what_does_not_fit(tiny_shapes, cache_dir):
    from captioner.data.datamodule import ResidentBatches
    from captioner.data.records import DatasetError

    auto = make(tiny_shapes, cache_dir, resident="auto")
    assert not isinstance(auto.train_dataloader(), ResidentBatches) and not auto.resident_rows
    tight = make(tiny_shapes, cache_dir, resident=True, resident_budget=1e-9)
    with pytest.raises(DatasetError, match=r"loader\.resident_budget=1e-09.*loader\.resident=auto"):
        tight.train_dataloader()
    with pytest.raises(ValueError, match="loader.resident"):
        CaptionDataModule(DATA, ENCODER, cache_dir=str(cache_dir), resident="yes")


def test_resident_auto_on_a_gpu_holds_the_splits_that_fit_the_budget(tiny_shapes, cache_dir, monkeypatch):
    """On a GPU `auto` holds split after split while they fit resident_budget of the memory free at the first, and
    reads the rest from the cache. (The device is faked: the decision, not CUDA, is under test; the tensors stay
    on the CPU.)"""
    import captioner.data.datamodule as datamodule
    from captioner.data.datamodule import ResidentBatches, ResidentRows

    dm = make(tiny_shapes, cache_dir, resident="auto", resident_budget=0.5)
    sizes = {s: dm.splits[s].features.nbytes for s in ("train", "val", "test")}
    free = 2 * (sizes["train"] + sizes["val"]) + 1  # half of it: train and val fit, test no longer does
    monkeypatch.setattr(dm, "_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(datamodule, "free_memory", lambda device: free)
    monkeypatch.setattr(ResidentRows, "load", classmethod(lambda cls, reader, device: cls(
        torch.from_numpy(reader.read(np.arange(reader.n))))))
    monkeypatch.setattr(dm, "_loader", lambda split, *a, **k: dm._resident_features(split))  # no pinned loader
    assert isinstance(dm.train_dataloader(), ResidentBatches)
    assert dm.val_dataloader() is dm.resident_rows["val"] and dm.test_dataloader() is None
    assert set(dm.resident_rows) == {"train", "val"}
    assert not isinstance(dm.splits["test"].features, ResidentRows)  # still the cache reader
