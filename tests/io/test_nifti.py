"""NIfTI-1 / NIfTI-2, 3-D / 4-D, big-endian: ingest then export comes back exact."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import NIBABEL_DATA, ingest_config
from voxelflow.errors import CorruptFileError, UnsupportedDataError
from voxelflow.export import export_nifti
from voxelflow.ingest import run_local
from voxelflow.io.nifti import read_nifti

FILES = ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz"]


@pytest.mark.parametrize("name", FILES)
def test_round_trip_is_exact(tmp_path, name):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(NIBABEL_DATA / name, src / name)
    summary = run_local(ingest_config([src], tmp_path / "store"))
    assert (summary["converted"], summary["failed"], summary["volumes"]) == (1, 0, 1)
    (out,) = export_nifti(tmp_path / "store", tmp_path / "out")
    orig, back = nib.load(NIBABEL_DATA / name), nib.load(out)
    want = np.asanyarray(orig.dataobj)
    got = np.asanyarray(back.dataobj)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype.newbyteorder("=")
    np.testing.assert_allclose(back.affine, orig.affine, atol=1e-6, rtol=0)
    if want.ndim == 4:
        assert back.header.get_zooms()[3] == pytest.approx(orig.header.get_zooms()[3] / (
            1000.0 if orig.header.get_xyzt_units()[1] == "msec" else 1.0))


def test_scaled_nifti_keeps_values_exact(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol = read_nifti(str(tmp_path / "scaled.nii"), "scaled.nii")
    np.testing.assert_array_equal(vol.data, raw * 0.5 - 3.0)
    assert vol.data.dtype == np.float32


def test_corrupt_gzip_is_a_typed_error(tmp_path):
    data = gzip.compress((NIBABEL_DATA / "anatomical.nii").read_bytes())
    (tmp_path / "bad.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"bad\.nii\.gz: NIfTI cannot be read"):
        read_nifti(str(tmp_path / "bad.nii.gz"), "bad.nii.gz")


def test_five_dimensional_nifti_is_unsupported(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 2, 3), np.float32), np.eye(4)), tmp_path / "v.nii")
    with pytest.raises(UnsupportedDataError, match=r"5-D NIfTI"):
        read_nifti(str(tmp_path / "v.nii"), "v.nii")
