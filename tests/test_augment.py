"""Augmentation: stored parameters replay exactly; image and label move together; intensity
transforms leave labels alone; the flow makes each copy once; GPU when present."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from voxelflow import catalog, store as st
from voxelflow.augment import (
    AUGMENTED_SCHEMA,
    AugmentConfig,
    OfflineConfig,
    OnTheFly,
    apply,
    output_root,
    planar_params,
    replay,
    run_local,
    sample_params,
)

EVERYTHING = AugmentConfig(elastic_prob=1.0, bias_prob=1.0)


@pytest.fixture(scope="module")
def offline(preprocessed_store):
    store, version = preprocessed_store
    config = OfflineConfig(store=store, version=version, copies=2, augment=EVERYTHING)
    return config, run_local(config)


def test_stored_parameters_replay_exactly(offline):
    config, summary = offline
    rows = catalog.read_table(output_root(config), "augmented", AUGMENTED_SCHEMA).to_pylist()
    assert summary["made"] == len(rows) > 0
    for row in rows:
        params = json.loads(row["params"])
        assert params["elastic"] and params["bias"]  # every transform really ran
        image, label = replay(config, row["augmented_id"])
        np.testing.assert_array_equal(image, st.open_volume(output_root(config), row["augmented_id"]).array[...])
        if row["label_digest"]:
            np.testing.assert_array_equal(label, st.open_label(output_root(config), row["augmented_id"],
                                                               "segmentation")[...])
        else:
            assert label is None  # the MR head: its tissue labels are named "brain"
    assert sum(bool(r["label_digest"]) for r in rows) == len(rows) - 2  # one MR volume, two copies


def test_each_copy_is_made_once(offline):
    config, summary = offline
    again = run_local(config)
    assert (again["made"], again["existing"]) == (0, summary["made"])


def _cube():
    label = torch.zeros((1, 32, 32, 32), dtype=torch.int64)
    label[0, 8:20, 10:24, 12:22] = 1
    label[0, 12:16, 14:18, 15:19] = 2
    return label.float() * 100.0, label


def test_spatial_transforms_move_image_and_label_together():
    image, label = _cube()
    params = sample_params(AugmentConfig(elastic_prob=1.0, noise_std=(0, 0), gamma=(1, 1), contrast=(1, 1),
                                         bias_prob=0.0), np.random.default_rng(3))
    params["flip"] = [0, 2]
    out_img, out_lab = apply(image, label, params, torch.device("cpu"))
    assert set(torch.unique(out_lab).tolist()) <= {0, 1, 2}
    agree = (torch.round(out_img / 100).clamp(0, 2).long() == out_lab).float().mean()
    assert agree > 0.95  # bilinear image vs nearest label differ only at edges


def test_intensity_transforms_leave_the_label_alone():
    image, label = _cube()
    params = sample_params(AugmentConfig(rotate_deg=0, scale=(1, 1), translate_vox=0, flip_prob=0, elastic_prob=0,
                                         bias_prob=1.0), np.random.default_rng(5))
    out_img, out_lab = apply(image, label, params, torch.device("cpu"))
    assert torch.equal(out_lab, label)
    assert not torch.allclose(out_img, image)


def test_on_the_fly_is_deterministic_per_sample():
    image, label = _cube()
    item = {"image": image, "label": label, "volume_id": "v", "origin": torch.tensor([1, 2, 3])}
    a, b = OnTheFly(EVERYTHING, seed=1)(dict(item)), OnTheFly(EVERYTHING, seed=1)(dict(item))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["params"] == b["params"]
    c = OnTheFly(EVERYTHING, seed=2)(dict(item))
    assert not torch.equal(a["image"], c["image"])


def test_a_slice_is_transformed_in_its_plane():
    """A patch one slice deep (a 2-D classifier's) is rotated about z only and scaled in-plane:
    a 3-D rotation would tilt it out of its one slice and leave a label of zeros."""
    label = torch.zeros((1, 1, 32, 32), dtype=torch.int64)
    label[0, 0, 4:28, 4:28] = 1
    image = label.float() * 100.0
    spatial = AugmentConfig(rotate_deg=15, scale=(0.9, 1.1), translate_vox=2, flip_prob=0.5, elastic_prob=1.0,
                            noise_std=(0, 0), gamma=(1, 1), contrast=(1, 1), bias_prob=0.0)
    tilted = apply(image, label, sample_params(spatial, np.random.default_rng(0)), torch.device("cpu"))[1]
    assert tilted.sum() < 0.5 * label.sum()  # the 3-D transform loses the slice
    for seed in range(5):
        item = {"image": image, "label": label, "volume_id": "v", "origin": torch.tensor([seed, 0, 0])}
        out = OnTheFly(spatial, seed=seed)(item)
        assert out["image"].shape == out["label"].shape == (1, 1, 32, 32)
        params = json.loads(out["params"])
        assert len(params["rotate"]) == 1 and len(params["scale"]) == 2 and params["elastic"] is None
        assert out["label"].sum() > 0.7 * label.sum()  # still the square, turned and scaled in-plane
        agree = (torch.round(out["image"] / 100).clamp(0, 1).long() == out["label"]).float().mean()
        assert agree > 0.95
    p = planar_params({"rotate": [0.1, 0.2, 0.3], "scale": [1.1, 1.2, 1.3], "translate": [1.0, 2.0, 3.0],
                       "flip": [0, 2], "elastic": {"seed": 1}, "gamma": 1.5})
    assert p == {"rotate": [0.1], "scale": [1.2, 1.3], "translate": [2.0, 3.0], "flip": [1], "elastic": None,
                 "gamma": 1.5}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gives_the_cpu_result():
    image, label = _cube()
    params = sample_params(AugmentConfig(elastic_prob=0.0), np.random.default_rng(0))
    cpu = apply(image, label, params, torch.device("cpu"))
    gpu = apply(image, label, params, torch.device("cuda"))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-3, rtol=1e-3)
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 0.01


@pytest.mark.slow
def test_flow_on_dask(offline, prefect_server):
    from flows.augment import run_augment

    config, _ = offline
    other = config.model_copy(update={"seed": 9, "copies": 1})
    summary = run_augment(other, n_workers=2)
    assert summary["made"] > 0
    rows = catalog.read_table(output_root(other), "augmented", AUGMENTED_SCHEMA).to_pylist()
    image, _ = replay(other, rows[0]["augmented_id"])
    np.testing.assert_allclose(image, st.open_volume(output_root(other), rows[0]["augmented_id"]).array[...],
                               atol=1e-4)  # computed in a worker with 1 torch thread


def test_on_the_fly_in_a_patch_loader_with_workers(offline):
    from voxelflow.data import make_loader, patch_dataset

    config, _ = offline
    ds = patch_dataset(config.store, (16, 24, 24), version=config.version, split="train", samples_per_epoch=4,
                       transform=OnTheFly(AugmentConfig(elastic_prob=0.5), seed=3))
    serial = list(make_loader(ds, batch_size=2, num_workers=0))
    parallel = list(make_loader(ds, batch_size=2, num_workers=2))
    for a, b in zip(serial, parallel):
        # equal up to float summation order: DataLoader workers run torch on one thread
        torch.testing.assert_close(a["image"], b["image"], atol=1e-4, rtol=1e-4)
        assert torch.equal(a["label"], b["label"]) and type(a["image"]) is torch.Tensor
        assert a["image"].shape == (2, 1, 16, 24, 24)
