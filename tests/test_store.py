"""The OME-Zarr store: exact round trips, anisotropic pyramids, NGFF metadata, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from voxelflow import store as st
from voxelflow.errors import StoreError
from voxelflow.geometry import level_affine


def _affine(spacing_xyz, origin=(10.0, -20.0, 30.0)):
    a = np.diag(list(spacing_xyz) + [1.0])
    a[:3, 3] = origin
    return a


def test_pyramid_halves_isotropic_axes_together():
    assert st.pyramid_factors((1.0, 1.0, 1.0), (256, 256, 256)) == [(2, 2, 2)] * 3


def test_pyramid_waits_for_thick_slices():
    # 5 mm slices, 0.7 mm in-plane: in-plane is halved until it is within 2x of 5 mm.
    steps = st.pyramid_factors((5.0, 0.7, 0.7), (40, 512, 512))
    assert steps[:3] == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert all(f[0] == 1 for f in steps[:2])


def test_pyramid_never_halves_a_single_slice():
    assert all(f[0] == 1 for f in st.pyramid_factors((1.0, 1.0, 1.0), (1, 512, 512)))


def test_downsample_is_block_mean_with_edge_replication():
    data = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    out = st.downsample(data, (2, 2, 2))
    assert out.shape == (2, 2, 2)
    assert out[0, 0, 0] == pytest.approx(data[:2, :2, :2].mean())
    # The odd last slice is averaged with its replica: the mean of slice 2 alone.
    assert out[1, 1, 1] == pytest.approx(data[2, 2:, 2:].mean())


@pytest.mark.parametrize("shape,factors,dtype", [
    ((37, 21, 19), (2, 2, 2), np.int16), ((37, 21, 19), (1, 2, 2), np.int16), ((5, 37, 9, 8), (2, 2, 1), np.uint8),
    ((40, 6, 7), (2, 1, 2), np.float32), ((3, 4, 4), (2, 2, 2), np.int32)])
def test_downsample_in_slabs_equals_one_pass(shape, factors, dtype):
    """Slabs along the first axis (odd lengths, a leading time axis, a first axis kept)
    give the voxels of one pass over the whole array, and the integer mean rounds half up."""
    data = np.random.default_rng(1).integers(-300 if dtype != np.uint8 else 0, 250, size=shape).astype(dtype)
    whole = st.downsample(data, factors, slab=10**6)
    for slab in (1, 2, 3, 8):
        out = st.downsample(data, factors, slab=slab)
        assert out.dtype == data.dtype
        np.testing.assert_array_equal(out, whole)
    if factors == (2, 2, 2) and dtype == np.int16:
        block = data[:2, :2, :2].astype(np.int64)
        assert whole[0, 0, 0] == (block.sum() + 4) // 8


def test_write_then_open_is_exact_and_chunked_reads_match(tmp_path):
    st.init_store(tmp_path / "s")
    rng = np.random.default_rng(0)
    data = rng.integers(-1024, 3000, size=(70, 90, 100), dtype=np.int16)
    aff = _affine((0.8, 0.8, 2.5))
    info = st.write_volume(tmp_path / "s", "v1", data, aff, chunk=32)
    vol = st.open_volume(tmp_path / "s", "v1")
    np.testing.assert_array_equal(vol.array[...], data)
    np.testing.assert_array_equal(vol.array[10:43, 5:77, 31:99], data[10:43, 5:77, 31:99])
    np.testing.assert_array_equal(vol.affine, aff)
    assert vol.array.chunks == (32, 32, 32)
    assert info.digest == st.content_digest(data)
    assert info.levels >= 2


def test_level_affine_points_at_block_centres(tmp_path):
    st.init_store(tmp_path / "s")
    data = np.zeros((8, 64, 64), dtype=np.int16)
    aff = _affine((1.0, 1.0, 4.0))
    st.write_volume(tmp_path / "s", "v", data, aff)
    lvl = st.open_volume(tmp_path / "s", "v", level=1)
    assert lvl.array.shape == (8, 32, 32)  # 4 mm slices are not halved first
    # Level voxel (0,0,0) is the centre of base voxels (0..1, 0..1, 0).
    centre = aff @ np.array([0.5, 0.5, 0.0, 1.0])
    np.testing.assert_allclose(lvl.affine @ np.array([0, 0, 0, 1.0]), centre)
    np.testing.assert_allclose(lvl.affine, level_affine(aff, (2, 2, 1)))


def test_ngff_metadata_reads_with_ome_zarr(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    st.init_store(tmp_path / "s")
    data = np.arange(4 * 64 * 64, dtype=np.int16).reshape(4, 64, 64)
    st.write_volume(tmp_path / "s", "v", data, _affine((0.5, 0.5, 3.0)))
    nodes = list(Reader(parse_url(str(tmp_path / "s" / "volumes" / "v")))())
    image = nodes[0]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    assert [a["name"] for a in image.metadata["axes"]] == ["z", "y", "x"]
    assert all(a["unit"] == "millimeter" for a in image.metadata["axes"])
    np.testing.assert_array_equal(np.asarray(image.data[0]), data)
    scale0 = image.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale0 == [3.0, 0.5, 0.5]


def test_four_d_volume_keeps_time_axis(tmp_path):
    st.init_store(tmp_path / "s")
    data = np.arange(3 * 4 * 8 * 8, dtype=np.float32).reshape(3, 4, 8, 8)
    st.write_volume(tmp_path / "s", "v", data, _affine((2.0, 2.0, 2.0)), time_step=2.5)
    vol = st.open_volume(tmp_path / "s", "v")
    np.testing.assert_array_equal(vol.array[...], data)
    assert vol.time_step == 2.5
    assert vol.array.metadata.dimension_names == ("t", "z", "y", "x")


def test_failed_write_leaves_no_visible_volume(tmp_path, monkeypatch):
    st.init_store(tmp_path / "s")
    data = np.ones((4, 64, 64), dtype=np.int16)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "downsample", broken)  # fails after s0 is written
    with pytest.raises(StoreError, match=r"cannot write volume v into .*No space left"):
        st.write_volume(tmp_path / "s", "v", data, _affine((1, 1, 1)))
    assert not st.volume_path(tmp_path / "s", "v").exists()
    assert not any((tmp_path / "s" / ".staging").iterdir())


def test_rewrite_replaces_the_complete_volume(tmp_path):
    st.init_store(tmp_path / "s")
    st.write_volume(tmp_path / "s", "v", np.zeros((2, 8, 8), np.int16), _affine((1, 1, 1)))
    st.write_volume(tmp_path / "s", "v", np.full((3, 8, 8), 7, np.int16), _affine((1, 1, 1)))
    np.testing.assert_array_equal(st.open_volume(tmp_path / "s", "v").array[...], 7)


def test_non_store_folder_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("hello")
    with pytest.raises(StoreError, match="not empty and is not a voxelflow store"):
        st.init_store(tmp_path / "x")
