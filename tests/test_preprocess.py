"""Preprocessing: canonical orientation, target spacing, normalisation, idempotence, exact
inverse geometry, and the sampled class locations."""

from __future__ import annotations

import numpy as np
import pytest

from voxelflow import catalog, store as st
from voxelflow.preprocess import PreprocessConfig, locations_for, output_root, resolve, run_local


@pytest.fixture(scope="module")
def preprocessed(labelled_store):
    # A spacing no other test module uses: this module's first run really processes.
    config = resolve(PreprocessConfig(store=str(labelled_store), spacing=(2.0, 2.0, 2.5)))
    summary = run_local(config)
    return labelled_store, config, summary


def test_outputs_are_canonical_resampled_and_normalised(preprocessed):
    store, config, summary = preprocessed
    assert summary["processed"] == 7 and summary["failed"] == 0
    rows = catalog.read_table(output_root(config), "preprocessed").to_pylist()
    for row in rows:
        vol = st.open_volume(output_root(config), row["volume_id"])
        assert row["orientation"] == "RAS"
        np.testing.assert_allclose(st.voxel_sizes(vol.affine), (2.0, 2.0, 2.5), atol=1e-6)
        data = vol.array[...]
        if row["modality"] == "CT":
            assert data.min() >= 0.0 and data.max() <= 1.0 and data.max() > 0.5
        else:
            fg = data[data != 0]
            assert abs(fg.mean()) < 0.05 and abs(fg.std() - 1) < 0.05


def test_same_configuration_again_does_no_work(preprocessed):
    store, config, _ = preprocessed
    root = output_root(config)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "catalog" not in p.parts}
    again = run_local(PreprocessConfig(store=str(store), spacing=(2.0, 2.0, 2.5)))
    assert (again["processed"], again["unchanged"]) == (0, 7)
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "catalog" not in p.parts}
    assert before == after
    other = PreprocessConfig(store=str(store), spacing=(3.0, 3.0, 3.0))
    assert other.version() != config.version()


def _labelled(root) -> list[dict]:
    """Rows of preprocessed volumes that carry the ``segmentation`` label (the synthetic MR
    head's tissue labels are named ``brain``)."""
    rows = [r for r in catalog.read_table(root, "preprocessed").to_pylist() if r["label_digest"]]
    assert rows
    return rows


def test_mapped_back_the_labels_land_on_the_original(preprocessed):
    """The centroid of each class, in world mm, agrees within one original voxel; and the
    preprocessed label resampled back onto the original grid overlaps it (Dice > 0.9)."""
    from scipy.ndimage import affine_transform

    store, config, _ = preprocessed
    root = output_root(config)
    for row in _labelled(root):
        vid = row["volume_id"]
        orig_vol = st.open_volume(store, vid)
        orig = st.open_label(store, vid, "segmentation")[...]
        new_vol = st.open_volume(root, vid)
        new = st.open_label(root, vid, "segmentation")[...]
        for value in row["classes"]:
            if (orig == value).sum() < 20:
                continue
            c_orig = orig_vol.affine @ np.r_[np.argwhere(orig == value).mean(axis=0)[::-1], 1]
            c_new = new_vol.affine @ np.r_[np.argwhere(new == value).mean(axis=0)[::-1], 1]
            assert np.linalg.norm(c_orig - c_new) < st.voxel_sizes(orig_vol.affine).max()
        m = np.linalg.inv(new_vol.affine) @ orig_vol.affine  # original (x,y,z) -> preprocessed (x,y,z)
        r = np.eye(4)[[2, 1, 0, 3]]
        m = r @ m @ r
        back = affine_transform(new, m[:3, :3], offset=m[:3, 3], output_shape=orig.shape, order=0)
        a, b = orig > 0, back > 0
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9


def test_locations_hold_their_class(preprocessed):
    _, config, _ = preprocessed
    root = output_root(config)
    for row in _labelled(root):
        label = st.open_label(root, row["volume_id"], "segmentation")[...]
        locs = locations_for(root, row["volume_id"])
        assert sorted(locs) == row["classes"]
        for value, zyx in locs.items():
            assert len(zyx) == min(10000, int((label == value).sum()))
            assert (label[tuple(zyx.T)] == value).all()


@pytest.mark.slow
def test_flow_on_dask_equals_the_library(preprocessed, prefect_server):
    from flows.preprocess import run_preprocess

    store, config, _ = preprocessed
    flow_config = PreprocessConfig(store=str(store), spacing=(2.0, 2.0, 2.5), interpolation="spline")
    summary = run_preprocess(flow_config, n_workers=2)
    assert summary["processed"] == 7
    local_config = resolve(PreprocessConfig(store=str(store), spacing=(2.0, 2.0, 2.5), interpolation="spline"))
    root = output_root(local_config)
    from_flow = {r["volume_id"]: (st.open_volume(root, r["volume_id"]).array[...],
                                  st.open_label(root, r["volume_id"], "segmentation")[...] if r["label_digest"] else None)
                 for r in catalog.read_table(root, "preprocessed").to_pylist()}
    import shutil

    shutil.rmtree(root)
    run_local(local_config)
    assert len(from_flow) == 7
    for vid, (image, label) in from_flow.items():
        # Equal up to float summation order (torch uses 1 thread in a Dask worker, more here).
        np.testing.assert_allclose(st.open_volume(root, vid).array[...], image, atol=1e-4)
        if label is not None:
            np.testing.assert_array_equal(st.open_label(root, vid, "segmentation")[...], label)
    assert sum(label is not None for _, label in from_flow.values()) == 6  # the CT volumes
