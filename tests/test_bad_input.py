"""Bad input: a typed error naming the file or series, recorded, and the run goes on with
every input file accounted for exactly once."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from tests.conftest import NIBABEL_DATA, PYDICOM_DATA, ingest_config
from voxelflow.errors import (
    CorruptFileError,
    NotAnImageError,
    PixelDecodeError,
    SeriesAssemblyError,
)
from voxelflow.ingest import run_local
from voxelflow.io.dicom import load_stack, plan_series, scan_dicom
from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series

KEY = b"k" * 32


def _broken_j2k(path):
    data = bytearray((PYDICOM_DATA / "MR_small_jp2klossless.dcm").read_bytes())
    soc = data.find(b"\xff\x4f\xff\x51")  # start of the JPEG 2000 codestream
    data[soc + 4: soc + 40] = b"\xff" * 36
    path.write_bytes(bytes(data))
    return path


def _record(path, name):
    return scan_dicom(str(path), name, KEY) | {"source": "s", "path": name, "local": str(path)}


# ----------------------------------------------------------------- one raise per class


def test_truncated_dicom_raises_corrupt_file():
    with pytest.raises(CorruptFileError, match=r"MR_truncated\.dcm: file is truncated: PixelData needs 8192 bytes from offset \d+, the file has 9630"):
        scan_dicom(str(PYDICOM_DATA / "MR_truncated.dcm"), "MR_truncated.dcm", KEY)


def test_garbage_after_dicm_magic_raises_corrupt_file(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    with pytest.raises(CorruptFileError, match=r"garbage\.dcm: .*not a valid DICOM object"):
        scan_dicom(str(path), "garbage.dcm", KEY)


@pytest.mark.parametrize("name,reason", [
    ("dicomdirtests/DICOMDIR", r"DICOMDIR \(media directory index"),
    ("test-SR.dcm", r"no pixel data \(SOP class: Comprehensive SR Storage\)"),
    ("rtstruct.dcm", r"no pixel data \(SOP class: RT Structure Set Storage\)"),
    ("liver_1frame.dcm", r"DICOM-SEG segmentation, not an image: attach it .* `voxelflow labels`"),
])
def test_objects_without_pixels_are_not_images(name, reason):
    with pytest.raises(NotAnImageError, match=reason):
        scan_dicom(str(PYDICOM_DATA / name), name, KEY)


def test_undecodable_pixel_data_raises_pixel_decode_error(tmp_path):
    rec = _record(_broken_j2k(tmp_path / "broken_j2k.dcm"), "broken_j2k.dcm")
    (plan,) = plan_series(rec["series"], [rec])
    with pytest.raises(PixelDecodeError, match=r"broken_j2k\.dcm: pixel data cannot be decoded \(JPEG 2000"):
        load_stack(plan)


def _shift_slice(path, mm: float) -> None:
    """Move one slice along the slice normal (z for axial) by ``mm``: irregular spacing."""
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [float(ds.ImagePositionPatient[2]) + mm]
    ds.save_as(path)


def test_missing_slices_split_the_stack_into_evenly_spaced_volumes(tmp_path):
    paths = write_ct_series(ct_phantom((6, 16, 16)), tmp_path, SeriesSpec())
    paths[2].unlink()
    recs = [_record(p, p.name) for p in paths if p.exists()]
    plans = plan_series(recs[0]["series"], recs)
    assert [p.shape[0] for p in plans] == [2, 3]
    assert [p.label for p in plans] == ["part 1 of 2 (slices 0-1)", "part 2 of 2 (slices 2-4)"]
    for p in plans:
        assert any("missing slices: gaps of 5 mm after slice 1 (about 1 missing)" in w for w in p.warnings)
        assert np.allclose(np.linalg.norm(p.affine[:3, 2]), 2.5)  # each part keeps the true spacing


def test_irregular_spacing_is_resampled_onto_an_even_grid(tmp_path):
    """Slices at 0, 2.5, 6, 7.5, 10, 12.5 mm: one volume of 6 slices 2.5 mm apart; slices on
    the grid keep their voxels, the one at 5 mm is interpolated between 2.5 and 6 mm."""
    vol = ct_phantom((6, 16, 16), seed=3)
    paths = write_ct_series(vol, tmp_path, SeriesSpec())
    _shift_slice(paths[2], 1.0)
    recs = [_record(p, p.name) for p in paths]
    (plan,) = plan_series(recs[0]["series"], recs)
    assert plan.shape == (6, 16, 16)
    assert np.isclose(np.linalg.norm(plan.affine[:3, 2]), 2.5)
    assert any("slices are not evenly spaced: gap 3.5 mm" in w and "resampled onto 6 evenly spaced slices of 2.5 mm"
               in w for w in plan.warnings)
    data = load_stack(plan)
    for k in (0, 1, 3, 4, 5):
        np.testing.assert_array_equal(data[k], vol[k])
    w = 2.5 / 3.5  # 5 mm lies between the slices at 2.5 mm and 6 mm
    np.testing.assert_array_equal(data[2], np.rint(vol[1] * (1 - w) + vol[2] * w).astype(vol.dtype))


def test_irregular_spacing_with_a_wide_gap_is_a_series_assembly_error(tmp_path):
    paths = write_ct_series(ct_phantom((6, 16, 16)), tmp_path, SeriesSpec())
    _shift_slice(paths[5], 4.0)  # 2.5 mm gaps, then 6.5 mm: a hole, not uneven spacing
    recs = [_record(p, p.name) for p in paths]
    with pytest.raises(SeriesAssemblyError, match=r"series S-\w+: slices are not evenly spaced: gap 6.5 mm.*"
                                                  r"not resampled \(a gap wider than 2x the median 2.5 mm"):
        plan_series(recs[0]["series"], recs)


def test_two_images_at_one_position_without_distinguisher_is_an_error(tmp_path):
    spec = SeriesSpec()
    a = write_ct_series(ct_phantom((3, 16, 16), seed=1), tmp_path / "a", spec)
    b = write_ct_series(ct_phantom((3, 16, 16), seed=2), tmp_path / "b", spec)
    recs = [_record(p, f"{p.parent.name}/{p.name}") for p in a + b]
    with pytest.raises(SeriesAssemblyError, match=r"6 images over 3 slice positions \(2 at each\) and no attribute .* "
                       r"cannot be ordered: InstanceNumber repeats at one position"):
        plan_series(recs[0]["series"], recs)


def test_images_at_one_position_split_by_echo_number(tmp_path):
    first = SeriesSpec(extra={"EchoNumbers": 1})
    a = write_ct_series(ct_phantom((3, 16, 16), seed=1), tmp_path / "a", first)
    second = SeriesSpec(extra={"EchoNumbers": 2}, series_uid=first.series_uid, study_uid=first.study_uid)
    b = write_ct_series(ct_phantom((3, 16, 16), seed=2), tmp_path / "b", second)
    recs = [_record(p, f"{p.parent.name}/{p.name}") for p in a + b]
    plans = plan_series(recs[0]["series"], recs)
    assert [p.label for p in plans] == ["e1", "e2"]
    assert all(p.shape == (3, 16, 16) for p in plans)


# ----------------------------------------------------------------- the run goes on


def _bad_archive(root):
    """A source holding one example of every bad-input class next to one good series."""
    src = root / "src"
    write_ct_series(ct_phantom((4, 16, 16)), src / "good", SeriesSpec())
    gap = write_ct_series(ct_phantom((5, 16, 16)), src / "gap", SeriesSpec())
    _shift_slice(gap[4], 4.0)  # a last gap of 6.5 mm after 2.5 mm ones: too wide to interpolate over
    shutil.copy(PYDICOM_DATA / "MR_truncated.dcm", src / "truncated.dcm")
    (src / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    (src / "notes.txt").write_text("not an image")
    (src / "empty.dcm").write_bytes(b"")
    shutil.copy(PYDICOM_DATA / "dicomdirtests" / "DICOMDIR", src / "DICOMDIR")
    shutil.copy(PYDICOM_DATA / "test-SR.dcm", src / "report.dcm")
    shutil.copy(PYDICOM_DATA / "rtstruct.dcm", src / "rtstruct.dcm")
    shutil.copy(PYDICOM_DATA / "SC_rgb_rle.dcm", src / "screenshot.dcm")
    _broken_j2k(src / "broken_j2k.dcm")
    data = gzip.compress((NIBABEL_DATA / "anatomical.nii").read_bytes())
    (src / "corrupt.nii.gz").write_bytes(data[: len(data) // 2])
    (src / "fake.nii").write_text("this is not nifti")
    # A zip with a path-traversal member and a symlink member, next to a good file.
    zpath = root / "hostile.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("../../escape.txt", "x")
        link = zipfile.ZipInfo("link.dcm")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.write(NIBABEL_DATA / "anatomical.nii", "ok/anatomical.nii")
    tpath = root / "links.tar"
    with tarfile.open(tpath, "w") as tf:
        info = tarfile.TarInfo("sym.dcm")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
        payload = b"plain text"
        info = tarfile.TarInfo("readme.md")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    (root / "broken.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    return [src, zpath, tpath, root / "broken.zip"]


EXPECTED = {
    "truncated.dcm": ("failed", "file is truncated: PixelData needs 8192 bytes"),
    "garbage.dcm": ("failed", "not a valid DICOM object"),
    "notes.txt": ("skipped", "not a DICOM or NIfTI file"),
    "empty.dcm": ("skipped", "empty file"),
    "DICOMDIR": ("skipped", "DICOMDIR"),
    "report.dcm": ("skipped", "no pixel data (SOP class: Comprehensive SR Storage)"),
    "rtstruct.dcm": ("skipped", "no pixel data (SOP class: RT Structure Set Storage)"),
    "screenshot.dcm": ("skipped", "secondary capture without patient geometry"),
    "broken_j2k.dcm": ("failed", "broken_j2k.dcm: pixel data cannot be decoded"),
    "corrupt.nii.gz": ("failed", "NIfTI cannot be read"),
    "fake.nii": ("failed", "named like DICOM/NIfTI but its content is neither"),
    "../../escape.txt": ("failed", "escapes the extraction folder"),
    "link.dcm": ("failed", "symbolic link inside archive"),
    "ok/anatomical.nii": ("converted", None),
    "sym.dcm": ("failed", "link inside archive"),
    "readme.md": ("skipped", "not a DICOM or NIfTI file"),
    "broken.zip": ("failed", "archive cannot be read"),
}


def test_every_bad_input_is_recorded_and_the_run_goes_on(tmp_path):
    sources = _bad_archive(tmp_path)
    summary = run_local(ingest_config(sources, tmp_path / "store"))
    files = pq.read_table(tmp_path / "store" / "catalog" / "files.parquet").to_pylist()
    by_path = {r["path"]: r for r in files}
    # Exactly one row per input, nothing outside the store written by the hostile zip.
    assert len(files) == len({(r["source"], r["path"]) for r in files}) == summary["files"]
    assert not (tmp_path.parent / "escape.txt").exists()
    for path, (status, reason) in EXPECTED.items():
        row = by_path[path]
        assert row["status"] == status, (path, row)
        if reason:
            assert reason in row["reason"], (path, row["reason"])
    for row in files:
        if row["path"].startswith("good/"):
            assert row["status"] == "converted" and row["volume_id"]
        if row["path"].startswith("gap/"):
            assert row["status"] == "failed" and "not evenly spaced" in row["reason"]
    volumes = pq.read_table(tmp_path / "store" / "catalog" / "volumes.parquet").to_pylist()
    assert len(volumes) == summary["volumes"] == 2  # the good series and the NIfTI from the zip
    assert summary["converted"] + summary["skipped"] + summary["failed"] == summary["files"]


def test_a_parser_crash_fails_only_that_file(tmp_path, monkeypatch):
    import voxelflow.ingest as ingest
    from voxelflow.ingest import scan
    from voxelflow.io.sources import InputFile

    paths = write_ct_series(ct_phantom((3, 16, 16)), tmp_path, SeriesSpec())
    real = scan.scan_dicom

    def crashing(local, path, key, **kw):
        if path.endswith("00002.dcm"):
            raise TypeError("unexpected value representation")
        return real(local, path, key, **kw)

    monkeypatch.setattr(scan, "scan_dicom", crashing)
    recs = [ingest.classify_file(InputFile("s", p.name, str(p)), KEY) for p in paths]
    assert [r.get("status") for r in recs] == [None, "failed", None]
    assert recs[1]["reason"] == "DICOM header cannot be read (TypeError: unexpected value representation)"


def test_accounting_and_summary_on_run_rows(tmp_path):
    """check_accounting fails loudly on a missing or a duplicate row; the summary counts
    statuses, reasons and unchanged files from the run's parts as they arrive."""
    from voxelflow.ingest import RunRows, check_accounting
    from voxelflow.io.sources import InputFile

    entries = [InputFile("s", f"f{i}", f"/x/f{i}") for i in range(3)]
    rows = [{"source": "s", "path": "f0", "status": "converted", "reason": None, "volume_id": "v", "digest": "d"},
            {"source": "s", "path": "f1", "status": "skipped", "reason": "not a DICOM or NIfTI file",
             "volume_id": None, "digest": "d"},
            {"source": "s", "path": "f2", "status": "converted", "reason": None, "volume_id": "v", "digest": "d",
             "unchanged": True}]

    def run_rows(name, *parts):
        out = RunRows(tmp_path / name)
        for part in parts:
            out.add("files", part)
        return out

    files = run_rows("ok", rows[:1], rows[1:])
    check_accounting(entries, files)
    summary = files.summary()
    assert (summary["files"], summary["converted"], summary["skipped"], summary["unchanged"]) == (3, 2, 1, 1)
    assert summary["top_reasons"] == [{"files": 1, "status": "skipped", "reason": "not a DICOM or NIfTI file"}]
    with pytest.raises(RuntimeError, match=r"missing \[\('s', 'f2'\)\]"):
        check_accounting(entries, run_rows("missing", rows[:2]))
    with pytest.raises(RuntimeError, match="1 duplicate rows"):
        check_accounting(entries, run_rows("dup", rows, rows[:1]))
    with pytest.raises(ValueError, match="unknown status 'done'"):
        run_rows("bad", [rows[0] | {"status": "done"}])


@pytest.mark.parametrize("keyword,value", [("RescaleSlope", "1,5"), ("ImagePositionPatient", "1\\x\\3"),
                                           ("PixelSpacing", "0.5")])
def test_a_malformed_number_is_reported_never_read_as_missing(tmp_path, keyword, value):
    (path,) = write_ct_series(ct_phantom((1, 8, 8)), tmp_path, SeriesSpec())
    ds = pydicom.dcmread(path)
    # written as text (LO), since pydicom will not write a malformed DS; readers see the string
    ds.add_new(pydicom.datadict.tag_for_keyword(keyword), "LO", value)
    ds.save_as(path)
    with pytest.raises(CorruptFileError, match=rf"{keyword} is '.*', expected"):
        scan_dicom(str(path), "x.dcm", KEY)
