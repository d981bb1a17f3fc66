"""Exported volumes equal dcm2niix's output in world space (voxels and affine)."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import PYDICOM_DATA, canonical, dcm2niix, ingest_config
from voxelflow.export import export_nifti
from voxelflow.ingest import run_local
from voxelflow.phantom import SeriesSpec, ct_phantom, oblique_orientation, write_ct_series


GENERATED = {
    "axial-hfs": SeriesSpec(),
    "axial-ffs": SeriesSpec(patient_position="FFS", orientation=(-1, 0, 0, 0, 1, 0),
                            origin=(150.0, -150.0, -300.0)),
    "descending": SeriesSpec(descending=True, origin=(-120.0, -140.0, 40.0), slice_spacing=1.25),
    "oblique": SeriesSpec(orientation=oblique_orientation(20, 35), origin=(-100.0, -90.0, 20.0),
                          pixel_spacing=(0.7, 0.9), slice_spacing=3.0),
    "sagittal": SeriesSpec(orientation=(0, 1, 0, 0, 0, -1), origin=(-40.0, -120.0, 110.0),
                           slice_spacing=2.0),
    "coronal-rotated": SeriesSpec(orientation=oblique_orientation(20, 90), origin=(-90.0, 30.0, 100.0)),
}


def _compare_with_dcm2niix(folder, tmp_path, expected_volumes):
    store = tmp_path / "store"
    summary = run_local(ingest_config([folder], store))
    assert summary["failed"] == 0, summary
    ours = {p.stem.removesuffix(".nii"): p for p in export_nifti(store, tmp_path / "ours")}
    ref = dcm2niix(folder, tmp_path / "ref")
    assert len(ours) == len(ref) == expected_volumes
    # Pair volumes by shape after canonical reorientation (orientation/order may differ).
    ours_c = [canonical(p) for p in ours.values()]
    for ref_path in ref:
        ref_data, ref_aff = canonical(ref_path)
        matches = [(d, a) for d, a in ours_c if d.shape == ref_data.shape and np.allclose(a, ref_aff, atol=1e-3)]
        assert len(matches) == 1, f"no volume matches {ref_path.name} in world space"
        np.testing.assert_array_equal(matches[0][0], ref_data)
        np.testing.assert_allclose(matches[0][1], ref_aff, atol=1e-3, rtol=0)


def test_real_ct_series_matches_dcm2niix(tmp_path):
    folder = tmp_path / "CT5N"
    shutil.copytree(PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT5N", folder)
    _compare_with_dcm2niix(folder, tmp_path, expected_volumes=1)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_series_matches_dcm2niix(tmp_path, name):
    folder = tmp_path / name
    hu = ct_phantom((12, 40, 48), spacing=(2.5, 0.8, 0.8), seed=3)
    write_ct_series(hu, folder, GENERATED[name])
    _compare_with_dcm2niix(folder, tmp_path, expected_volumes=1)


def test_several_series_in_one_folder_match_dcm2niix(tmp_path):
    folder = tmp_path / "mixed"
    write_ct_series(ct_phantom((10, 32, 32), seed=1), folder, SeriesSpec(series_number=1), prefix="A")
    write_ct_series(ct_phantom((7, 24, 40), seed=2), folder, GENERATED["oblique"], prefix="B")
    write_ct_series(ct_phantom((9, 32, 32), seed=4), folder, GENERATED["descending"], prefix="C")
    _compare_with_dcm2niix(folder, tmp_path, expected_volumes=3)


def test_stored_values_are_hounsfield_units_in_int16(tmp_path):
    hu = ct_phantom((6, 24, 24), seed=5)
    write_ct_series(hu, tmp_path / "s", SeriesSpec())
    run_local(ingest_config([tmp_path / "s"], tmp_path / "store"))
    row = pq.read_table(tmp_path / "store" / "catalog" / "volumes.parquet").to_pylist()[0]
    assert row["dtype"] == "int16"
    from voxelflow.store import open_volume

    np.testing.assert_array_equal(open_volume(tmp_path / "store", row["volume_id"]).array[...], hu)


def test_a_series_with_a_missing_slice_is_split_and_each_part_matches_dcm2niix(tmp_path):
    """One slice missing: two evenly spaced volumes, each equal in world space to dcm2niix's
    conversion of that part's files alone (dcm2niix itself would give the whole series one
    spacing with a warning)."""
    paths = write_ct_series(ct_phantom((9, 24, 24), seed=6), tmp_path / "gap", GENERATED["oblique"])
    paths[4].unlink()
    store = tmp_path / "store"
    summary = run_local(ingest_config([tmp_path / "gap"], store))
    assert (summary["volumes"], summary["failed"]) == (2, 0), summary
    rows = pq.read_table(store / "catalog" / "volumes.parquet").to_pylist()
    assert all(any("missing slices" in w for w in r["warnings"]) for r in rows)
    ours = [canonical(p) for p in export_nifti(store, tmp_path / "ours")]
    for k, part in enumerate((paths[:4], paths[5:])):
        folder = tmp_path / f"part{k}"
        folder.mkdir()
        for p in part:
            shutil.copy(p, folder / p.name)
        [ref] = dcm2niix(folder, tmp_path / f"ref{k}")
        ref_data, ref_aff = canonical(ref)
        matches = [(d, a) for d, a in ours if d.shape == ref_data.shape and np.allclose(a, ref_aff, atol=1e-3)]
        assert len(matches) == 1
        np.testing.assert_array_equal(matches[0][0], ref_data)
