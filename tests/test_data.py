"""ZarrPatchDataset: reads only the chunks a patch touches, samples foreground at the set rate,
balances classes, is deterministic per seed whatever the workers, and reads fsspec stores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from zarr.storage import LocalStore, WrapperStore

from voxelflow import store as st
from voxelflow.data import VolumeEntry, ZarrPatchDataset, make_loader, patch_dataset


class CountingStore(WrapperStore):
    """Records every key read: the evidence of what a patch costs."""

    def __init__(self, store):
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await super().get(key, prototype, byte_range)


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    root = tmp_path_factory.mktemp("cube")
    st.init_store(root)
    data = np.arange(64 * 64 * 64, dtype=np.int32).reshape(64, 64, 64)
    st.write_volume(root, "v", data, np.eye(4), chunk=16)
    labels = np.zeros((64, 64, 64), np.uint8)
    labels[40:44, 10:14, 50:54] = 1
    st.write_label(root, "v", "segmentation", labels)
    locations = {1: np.argwhere(labels == 1)}
    return root, data, labels, locations


def test_a_patch_reads_only_the_chunks_it_touches(cube):
    root, data, _, _ = cube
    counting = CountingStore(LocalStore(str(root), read_only=True))
    ds = ZarrPatchDataset(counting, [VolumeEntry("v", (64, 64, 64))], (20, 20, 20), label_name=None,
                          foreground_oversample=0, samples_per_epoch=20, seed=1)
    ds[0]  # opens the arrays (metadata reads)
    for i in range(1, 20):
        counting.keys.clear()
        item = ds[i]
        origin = item["origin"].tolist()
        np.testing.assert_array_equal(item["image"][0].numpy(),
                                      data[origin[0]:origin[0] + 20, origin[1]:origin[1] + 20, origin[2]:origin[2] + 20])
        want = {f"volumes/v/s0/c/{a}/{b}/{c}" for a, b, c in itertools.product(
            *(range(o // 16, (o + 19) // 16 + 1) for o in origin))}
        assert set(counting.keys) == want  # every touched chunk once, nothing else
        assert len(counting.keys) == len(want) <= 27  # a 20-voxel patch spans at most 3 chunks per axis


def test_a_chunk_cache_decodes_each_chunk_once_and_keeps_to_its_budget(cube):
    root, data, labels, locations = cube
    counting = CountingStore(LocalStore(str(root), read_only=True))
    entries = [VolumeEntry("v", (64, 64, 64), locations=locations)]
    # ten 16^3 int32 image chunks and the label's one 64^3 uint8 chunk
    budget = (10 * 16 ** 3 * 4 + 64 ** 3) / 2**20
    ds = ZarrPatchDataset(counting, entries, (20, 20, 20), samples_per_epoch=200, seed=3, cache_mb=budget)
    for i in range(200):
        item = ds[i]
        o = item["origin"].tolist()
        window = tuple(slice(a, a + 20) for a in o)
        np.testing.assert_array_equal(item["image"][0].numpy(), data[window])
        np.testing.assert_array_equal(item["label"][0].numpy(), labels[window])
        assert ds._cached <= ds.cache_bytes  # least recently used chunks went out
    reads = [k for k in counting.keys if "/c/" in k]
    assert len(reads) > 64 + 1  # the budget is smaller than the 64 image chunks: some were read again
    counting.keys.clear()
    again = ds[199]  # its chunks were the last used: all cached
    assert not [k for k in counting.keys if "/c/" in k]
    assert torch.equal(again["image"], item["image"])
    unbounded = ZarrPatchDataset(counting, entries, (20, 20, 20), samples_per_epoch=200, seed=3, cache_mb=64)
    counting.keys.clear()
    for i in range(200):
        unbounded[i]
    reads = [k for k in counting.keys if "/c/" in k]
    assert len(reads) == len(set(reads))  # every chunk decoded at most once


def test_foreground_is_sampled_at_the_configured_rate(cube):
    root, _, labels, locations = cube
    entries = [VolumeEntry("v", (64, 64, 64), locations=locations)]
    ds = ZarrPatchDataset(str(root), entries, (8, 8, 8), samples_per_epoch=3000, seed=0)
    rate = np.mean([ds.sample(i)[2] for i in range(3000)])
    assert abs(rate - 1 / 3) < 0.03
    always = ZarrPatchDataset(str(root), entries, (8, 8, 8), foreground_oversample=1.0, samples_per_epoch=50)
    for i in range(50):
        assert always[i]["label"].sum() > 0  # every patch holds the small labelled structure
    never = ZarrPatchDataset(str(root), entries, (8, 8, 8), foreground_oversample=0.0, samples_per_epoch=200)
    assert np.mean([never[i]["label"].sum() > 0 for i in range(200)]) < 0.1


def test_same_patches_whatever_the_workers_and_other_ones_next_epoch(cube):
    root, *_ = cube
    ds = ZarrPatchDataset(str(root), [VolumeEntry("v", (64, 64, 64))], (16, 16, 16), samples_per_epoch=12, seed=7)
    serial = [b["origin"] for b in make_loader(ds, batch_size=3, num_workers=0)]
    parallel = [b["origin"] for b in make_loader(ds, batch_size=3, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == 4
    ds.set_epoch(1)
    assert not all(torch.equal(a, b["origin"]) for a, b in zip(serial, make_loader(ds, batch_size=3)))


def test_class_balanced_sampling(cube):
    root, *_ = cube
    entries = [VolumeEntry("v", (64, 64, 64), label="lesion")] + \
        [VolumeEntry("v", (64, 64, 64), label="no_lesion") for _ in range(4)]
    plain = ZarrPatchDataset(str(root), entries, (8, 8, 8), label_name=None, samples_per_epoch=2000)
    balanced = ZarrPatchDataset(str(root), entries, (8, 8, 8), label_name=None, class_balanced=True,
                                samples_per_epoch=2000)
    share = [np.mean([entries[d.sample(i)[0]].label == "lesion" for i in range(2000)]) for d in (plain, balanced)]
    assert abs(share[0] - 0.2) < 0.04 and abs(share[1] - 0.5) < 0.04


def test_small_volumes_are_padded(cube):
    root, data, *_ = cube
    ds = ZarrPatchDataset(str(root), [VolumeEntry("v", (64, 64, 64))], (80, 16, 16), label_name=None,
                          samples_per_epoch=3)
    item = ds[0]
    assert tuple(item["image"].shape) == (1, 80, 16, 16)
    assert item["image"][0, 64:].abs().sum() == 0


def test_dataset_from_a_preprocessed_split_and_an_fsspec_url(labelled_store, preprocessed_store):
    _, version = preprocessed_store
    local = patch_dataset(str(labelled_store), (16, 32, 32), version=version, split="train",
                          samples_per_epoch=6)
    remote = patch_dataset(f"file://{labelled_store}", (16, 32, 32), version=version, split="train",
                           samples_per_epoch=6)
    from voxelflow import catalog

    train = {r["volume_id"] for r in catalog.read_table(labelled_store, "splits").to_pylist() if r["split"] == "train"}
    labelled = {r["volume_id"] for r in catalog.read_table(labelled_store, "labels").to_pylist()
                if r["name"] == "segmentation"}
    assert train - labelled  # the MR volume's labels are named "brain": not a source of segmentation patches
    assert {e.volume_id for e in local.entries} == train & labelled
    images_only = patch_dataset(str(labelled_store), (16, 32, 32), version=version, split="train",
                                label_name=None)
    assert {e.volume_id for e in images_only.entries} == train
    assert all(e.locations for e in local.entries)  # from preprocessing: foreground oversampling works
    for i in range(6):
        a, b = local[i], remote[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_patch_classes_from_the_label(labelled_store, preprocessed_store):
    """With ``class_from_label`` a patch is "lesion" exactly when it holds enough lesion voxels,
    whatever its volume's class."""
    _, version = preprocessed_store
    ds = patch_dataset(str(labelled_store), (8, 16, 16), version=version, samples_per_epoch=60,
                       class_balanced=True, foreground_oversample=2 / 3, class_from_label=(2, 5, "lesion"))
    assert ds.classes == ["lesion", "no_lesion"]
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        lesion = item["label"][0] == 2
        centre = int(lesion[2:6, 4:12, 4:12].sum())
        expected = 0 if centre >= 5 else (-1 if lesion.any() else 1)
        assert item["class"] == expected
        seen.add(expected)
    assert {0, 1} <= seen
    with pytest.raises(ValueError, match="two classes"):
        patch_dataset(str(labelled_store), (8, 16, 16), version=version, class_balanced=True,
                      class_from_label=(2, 5, "tumour"))


def test_focus_centres_a_share_of_patches_on_a_label(cube):
    """``focus=(value, share)``: that share of the patches is centred on a voxel of the value
    (rare findings); a value no volume has changes nothing."""
    root, _, labels, locations = cube
    entries = [VolumeEntry("v", (64, 64, 64), locations=locations)]
    value = max(locations)
    ds = ZarrPatchDataset(str(root), entries, (8, 8, 8), foreground_oversample=0.0, samples_per_epoch=400,
                          focus=(value, 0.5))
    centred = [ds[i]["label"][0, 4, 4, 4] == value for i in range(400)]
    assert 0.42 < np.mean(centred) < 0.62
    none = ZarrPatchDataset(str(root), entries, (8, 8, 8), foreground_oversample=0.0, samples_per_epoch=50,
                            focus=(value + 7, 1.0))
    assert [none.sample(i) for i in range(50)] == [ZarrPatchDataset(
        str(root), entries, (8, 8, 8), foreground_oversample=0.0, samples_per_epoch=50).sample(i) for i in range(50)]
