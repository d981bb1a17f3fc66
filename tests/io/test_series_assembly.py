"""Series assembly: stacks split by orientation and matrix, spacing from positions, rescale and
lossless dtype choice."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import PYDICOM_DATA
from voxelflow.io.dicom import load_stack, plan_series, scan_dicom
from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series

KEY = b"k" * 32


def _records(paths):
    return [scan_dicom(str(p), p.name, KEY) | {"source": "s", "path": f"{p.parent.name}/{p.name}", "local": str(p)}
            for p in paths]


def test_two_orthogonal_scouts_in_one_series_become_two_stacks():
    paths = sorted((PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT2N").iterdir())
    recs = _records(paths)
    assert len({r["series"] for r in recs}) == 1
    plans = plan_series(recs[0]["series"], recs)
    assert len(plans) == 2
    normals = [np.cross(p.affine[:3, 0], p.affine[:3, 1]) for p in plans]
    assert abs(float(normals[0] @ normals[1])) < 1e-6  # orthogonal planes, never one stack


def test_several_series_in_one_folder_are_kept_apart():
    paths = sorted((PYDICOM_DATA / "dicomdirtests" / "98892003" / "MR2").iterdir())
    recs = _records(paths)
    series = {r["series"] for r in recs}
    assert len(series) > 1
    for uid in series:
        for plan in plan_series(uid, [r for r in recs if r["series"] == uid]):
            assert {f["series"] for f in plan.files} == {uid}


def test_different_matrix_sizes_split_into_stacks(tmp_path):
    spec = SeriesSpec()
    a = write_ct_series(ct_phantom((3, 16, 16)), tmp_path / "a", spec)
    b = write_ct_series(ct_phantom((4, 24, 24)), tmp_path / "b", SeriesSpec(series_uid=spec.series_uid,
                                                                               origin=(-150, -150, 100)))
    plans = plan_series(_records(a)[0]["series"], _records(a + b))
    assert sorted(p.shape for p in plans) == [(3, 16, 16), (4, 24, 24)]
    assert all(p.label for p in plans)  # the catalog says what separates them


def test_spacing_comes_from_positions_not_slice_thickness(tmp_path):
    paths = write_ct_series(ct_phantom((5, 16, 16)), tmp_path,
                            SeriesSpec(slice_spacing=2.5, extra={"SliceThickness": "5"}))
    (plan,) = plan_series(_records(paths)[0]["series"], _records(paths))
    assert np.linalg.norm(plan.affine[:3, 2]) == pytest.approx(2.5)
    assert any("differs from SliceThickness 5" in w for w in plan.warnings)


def test_gantry_tilt_keeps_the_sheared_geometry_and_says_so(tmp_path):
    spec = SeriesSpec()
    paths = write_ct_series(ct_phantom((5, 16, 16)), tmp_path, spec)
    import pydicom

    for k, p in enumerate(paths):  # shift each slice along y: a 10 degree tilt
        ds = pydicom.dcmread(p)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y + k * 2.5 * np.tan(np.radians(10)):.4f}", f"{z:.4f}"]
        ds.save_as(p)
    (plan,) = plan_series(_records(paths)[0]["series"], _records(paths))
    assert any("gantry tilt / shear of 10.00 degrees" in w for w in plan.warnings)
    last = plan.affine @ np.array([0, 0, 4, 1.0])
    assert last[1] == pytest.approx(-(-150 + 4 * 2.5 * np.tan(np.radians(10))), abs=1e-3)  # RAS y = -LPS y


@pytest.mark.parametrize("slope,intercept,raw_max,dtype", [
    (1, -1024, 4095, np.int16),  # CT: HU fit int16
    (1, 0, 65535, np.uint16),  # unsigned data beyond int16
    (1, 1000, 65535, np.int32),  # beyond uint16
    (0.5, -3, 4095, np.float32),  # fractional: float32 is exact here
])
def test_rescale_and_lossless_dtype(tmp_path, slope, intercept, raw_max, dtype):
    hu = ct_phantom((2, 16, 16))
    paths = write_ct_series(hu, tmp_path, SeriesSpec(extra={"RescaleSlope": str(slope),
                                                            "RescaleIntercept": str(intercept)}))
    import pydicom

    raw = np.linspace(0, raw_max, 16 * 16).astype(np.uint16).reshape(16, 16)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PixelData = raw.tobytes()
        ds.save_as(p)
    (plan,) = plan_series(_records(paths)[0]["series"], _records(paths))
    data = load_stack(plan)
    assert data.dtype == dtype
    np.testing.assert_array_equal(data[0], raw.astype(np.float64) * slope + intercept)


def test_localizers_are_skipped_with_the_reason_unless_kept(tmp_path):
    """The real scouts of pydicom's CT2N (ImageType ORIGINAL\\PRIMARY\\LOCALIZER) mixed into a
    folder with an axial series: the axial series is a volume, each scout a skipped file with
    its reason; with keep_localizers they are stored as 2-D images."""
    import shutil

    from tests.conftest import ingest_config
    from voxelflow import catalog
    from voxelflow.ingest import IngestConfig, run_local

    src = tmp_path / "src"
    shutil.copytree(PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT2N", src / "scouts")
    write_ct_series(ct_phantom((5, 16, 16)), src / "axial", SeriesSpec())
    summary = run_local(ingest_config([src], tmp_path / "store"))
    assert (summary["volumes"], summary["skipped"], summary["failed"]) == (1, 2, 0), summary
    rows = {r["path"]: r for r in catalog.read_table(tmp_path / "store", "files").to_pylist()}
    for name in ("scouts/6293", "scouts/6924"):
        assert rows[name]["status"] == "skipped" and "localizer / scout image" in rows[name]["reason"]
    kept = run_local(IngestConfig(sources=[str(src / "scouts")], store=str(tmp_path / "kept"), keep_localizers=True))
    assert kept["volumes"] == 2
