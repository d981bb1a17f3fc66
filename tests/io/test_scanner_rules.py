"""One rule each, on small generated series (the real-scanner corpus test says whether the
rules match what scanners write): kinds split and named, 4-D series without a time attribute,
vendor private attributes, Philips precise scaling, GE diffusion, gzip-compressed files,
stray slices, gantry tilt resampled on request."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import PYDICOM_DATA, ingest_config
from voxelflow import catalog
from voxelflow.errors import SeriesAssemblyError
from voxelflow.export import export_volume
from voxelflow.geometry import shear_angle_deg
from voxelflow.ingest import run_local
from voxelflow.io.dicom import load_stack, plan_series, scan_dicom
from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series

KEY = b"r" * 32


def _records(paths):
    return [scan_dicom(str(p), p.name, KEY) | {"source": "s", "path": f"{p.parent.name}/{p.name}", "local": str(p)}
            for p in paths]


def _edit(paths, change):
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        change(k, ds)
        ds.save_as(p)


def _repeats(tmp_path, n: int, slices: int = 3, **extra) -> list:
    """``n`` images at each of ``slices`` positions, one series, instance numbers time-major
    (time point t, slice z: ``t * slices + z + 1``), the pixels of time point t all equal t."""
    spec = SeriesSpec(extra=extra)
    paths = []
    for t in range(n):
        spec_t = SeriesSpec(extra=extra, series_uid=spec.series_uid, study_uid=spec.study_uid,
                            frame_uid=spec.frame_uid)
        vol = np.full((slices, 8, 8), t * 10, np.int16)
        ps = write_ct_series(vol, tmp_path / f"t{t}", spec_t)
        _edit(ps, lambda z, ds, t=t: setattr(ds, "InstanceNumber", t * slices + z + 1))
        paths += ps
    return paths


def test_echo_and_complex_part_combine_into_four_named_stacks(tmp_path):
    paths = []
    spec = SeriesSpec()
    for echo in (1, 2):
        for part in ("M", "P"):
            s = SeriesSpec(series_uid=spec.series_uid, study_uid=spec.study_uid, frame_uid=spec.frame_uid,
                           extra={"EchoNumbers": echo, "ImageType": ["ORIGINAL", "PRIMARY", part, "ND"]})
            paths += write_ct_series(ct_phantom((3, 8, 8), seed=echo), tmp_path / f"{echo}{part}", s)
    recs = _records(paths)
    assert {r["component"] for r in recs} == {"magnitude", "phase"}
    plans = plan_series(recs[0]["series"], recs)
    assert sorted(p.label for p in plans) == ["e1", "e1_ph", "e2", "e2_ph"]
    assert all(p.shape == (3, 8, 8) for p in plans)


def test_repeats_without_a_time_attribute_become_4d_in_instance_order(tmp_path):
    paths = _repeats(tmp_path, 3)
    rng = np.random.default_rng(0)
    shuffled = [paths[i] for i in rng.permutation(len(paths))]  # the order files are found in
    recs = _records(shuffled)
    (plan,) = plan_series(recs[0]["series"], recs)
    assert plan.timepoints == 3 and plan.shape == (3, 8, 8)
    assert any("ordered by InstanceNumber at each slice position" in w for w in plan.warnings)
    data = load_stack(plan)
    assert [int(data[t].mean()) for t in range(3)] == [0, 10, 20]


def test_an_incomplete_time_point_is_refused_with_the_reason(tmp_path):
    paths = _repeats(tmp_path, 3)
    paths[-1].unlink()  # the last time point misses its last slice
    recs = _records(paths[:-1])
    with pytest.raises(SeriesAssemblyError, match=r"hold 2 to 3 images each .* some time points would miss slices"):
        plan_series(recs[0]["series"], recs)


def test_ge_private_image_type_tells_magnitude_from_phase(tmp_path):
    paths = _repeats(tmp_path, 2, Manufacturer="GE MEDICAL SYSTEMS")
    _edit(paths, lambda k, ds: ds.add_new(0x0043102F, "SS", 0 if k < 3 else 1))
    recs = _records(paths)
    assert [r["component"] for r in recs] == ["magnitude"] * 3 + ["phase"] * 3
    assert scan_dicom(str(paths[4]), "x", KEY, fast=False)["component"] == "phase"  # pydicom reads it too
    assert sorted(p.label for p in plan_series(recs[0]["series"], recs)) == ["", "ph"]


def test_ge_dwi_b_values_and_directions_from_private_tags(tmp_path):
    directions = [(0, 0, 0), (1, 0, 0), (0, 0.6, 0.8)]
    paths = _repeats(tmp_path, 3, Manufacturer="GE MEDICAL SYSTEMS")

    def tag(k, ds):
        t = k // 3
        ds.add_new(0x00431039, "IS", [0 if t == 0 else 1000, 8, 0, 0])
        for elem, v in zip((0x001910BB, 0x001910BC, 0x001910BD), directions[t]):
            ds.add_new(elem, "DS", str(v))
    _edit(paths, tag)
    store = tmp_path / "store"
    run_local(ingest_config([tmp_path / f"t{t}" for t in range(3)], store))
    (vol,) = catalog.read_table(store, "volumes").to_pylist()
    diffusion = json.loads(vol["attributes"])["diffusion"]
    assert diffusion["b_values"] == [0, 1000, 1000]
    # GE's vector is in the image frame with the in-plane signs flipped (identity orientation here)
    assert diffusion["directions_lps"] == [[0, 0, 0], [-1, 0, 0], [0, -0.6, 0.8]]
    out = export_volume(store, vol["volume_id"], tmp_path / "dwi.nii.gz")
    assert np.loadtxt(tmp_path / "dwi.bval").tolist() == [0, 1000, 1000]
    bvecs = np.loadtxt(tmp_path / "dwi.bvec")
    assert nib.load(out).shape == (8, 8, 3, 3) and bvecs.shape == (3, 3)
    assert np.allclose(np.linalg.norm(bvecs, axis=0), [0, 1, 1])


def test_philips_precise_scaling_divides_by_the_private_scale_slope(tmp_path):
    paths = write_ct_series(ct_phantom((3, 8, 8)), tmp_path, SeriesSpec(extra={"Manufacturer": "Philips"}))
    _edit(paths, lambda k, ds: (ds.add_new(0x2005100E, "FL", 0.25), setattr(ds, "RescaleSlope", "2"),
                                setattr(ds, "RescaleIntercept", "-8")))
    recs = _records(paths)
    assert recs[0]["scale_slope"] == 0.25
    (plan,) = plan_series(recs[0]["series"], recs)
    raw = pydicom.dcmread(paths[0]).pixel_array.astype(np.float64)
    # (SV * RS + RI) / (RS * SS) = SV / 0.25 - 8 / 0.5
    assert np.array_equal(load_stack(plan)[0], raw / 0.25 - 16)


def test_gzip_compressed_dicom_is_read_and_a_broken_one_is_recorded(tmp_path):
    src = tmp_path / "src"
    for p in write_ct_series(ct_phantom((4, 8, 8)), tmp_path / "plain", SeriesSpec()):
        (src / f"{p.name}.gz").parent.mkdir(parents=True, exist_ok=True)
        (src / f"{p.name}.gz").write_bytes(gzip.compress(p.read_bytes()))
    (src / "broken.dcm.gz").write_bytes(b"not gzip at all")
    store = tmp_path / "store"
    summary = run_local(ingest_config([src], store))
    assert summary["files"] == 5
    rows = {r["path"]: r for r in catalog.read_table(store, "files").to_pylist()}
    assert sum(r["status"] == "converted" for r in rows.values()) == 4
    assert all(p.endswith(".dcm.gz") for p in rows)
    assert rows["broken.dcm.gz"]["status"] == "failed"
    assert "gzip-compressed file cannot be decompressed" in rows["broken.dcm.gz"]["reason"]


def test_a_stray_slice_far_from_its_stack_is_reported_and_the_stack_kept(tmp_path):
    src = tmp_path / "CT2"
    shutil.copytree(PYDICOM_DATA / "dicomdirtests" / "77654033" / "CT2", src)
    store = tmp_path / "store"
    run_local(ingest_config([src], store))
    (vol,) = catalog.read_table(store, "volumes").to_pylist()
    assert vol["shape"][0] == 3
    files = catalog.read_table(store, "files").to_pylist()
    stray = [r for r in files if r["status"] != "converted"]
    assert len(stray) == 1 and stray[0]["status"] == "skipped"
    assert "stray slice" in stray[0]["reason"] and "202.5 mm from the nearest other slice" in stray[0]["reason"]


def _tilted_series(tmp_path) -> list:
    paths = write_ct_series(ct_phantom((6, 16, 16)), tmp_path / "tilt", SeriesSpec())
    _edit(paths, lambda k, ds: setattr(ds, "ImagePositionPatient", [
        "-150", f"{-150 + k * 2.5 * np.tan(np.radians(10)):.4f}", f"{k * 2.5:.4f}"]))
    return paths


@pytest.mark.parametrize("resample", [False, True])
def test_gantry_tilt_is_kept_sheared_or_resampled_and_the_catalog_says_which(tmp_path, resample):
    _tilted_series(tmp_path)
    store = tmp_path / "store"
    run_local(ingest_config([tmp_path / "tilt"], store, resample_tilt=resample))
    (vol,) = catalog.read_table(store, "volumes").to_pylist()
    affine = np.array(vol["affine"]).reshape(4, 4)
    tilt = json.loads(vol["attributes"])["tilt"]
    if resample:
        assert tilt.startswith("resampled: a gantry tilt of 10.00 degrees")
        assert shear_angle_deg(affine) < 0.01 and vol["shape"][1] > 16  # rows added for the shift
    else:
        assert tilt.startswith("sheared: a gantry tilt of 10.00 degrees")
        assert shear_angle_deg(affine) == pytest.approx(10, abs=0.01)


def test_an_rgb_map_with_geometry_is_a_colour_volume_and_a_screen_capture_is_not(tmp_path):
    paths = write_ct_series(ct_phantom((3, 8, 8)), tmp_path / "rgb", SeriesSpec())
    colours = np.random.default_rng(1).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)

    def to_rgb(k, ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.PixelData = colours[k].tobytes()
    _edit(paths, to_rgb)
    store = tmp_path / "store"
    run_local(ingest_config([tmp_path / "rgb"], store))
    (vol,) = catalog.read_table(store, "volumes").to_pylist()
    assert vol["shape"] == [3, 3, 8, 8] and vol["dtype"] == "uint8"
    img = nib.load(export_volume(store, vol["volume_id"], tmp_path / "rgb.nii.gz"))
    assert img.get_data_dtype().names == ("R", "G", "B") and img.shape == (8, 8, 3)
    rgb = np.asanyarray(img.dataobj)
    assert np.array_equal(rgb["G"], np.transpose(colours[..., 1], (2, 1, 0)))  # (x, y, z) of slice k's rows
    _edit(paths, lambda k, ds: (setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"),
                                delattr(ds, "ImagePositionPatient")))
    recs = _records(paths)
    with pytest.raises(Exception, match=r"color images .* without patient geometry are not a volume"):
        plan_series(recs[0]["series"], recs)
