"""The synthetic labelled archive: deterministic, realistic, and its labels on the image grid."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pydicom
import pyarrow.parquet as pq
import pytest

from tests.conftest import ingest_config
from voxelflow.ingest import run_local
from voxelflow.synth import LESION, LIVER, SynthConfig, build_synthetic_archive

SMALL = SynthConfig(patients=5, mr_patients=1, shape=(16, 48, 48), dicom_seg_every=2)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return build_synthetic_archive(tmp_path_factory.mktemp("synth") / "a", SMALL)


def _pixels(root):
    out = {}
    for p in sorted((root / "images").rglob("*")):
        if p.suffix == ".dcm":
            out[p.relative_to(root).as_posix()] = pydicom.dcmread(p).PixelData
        elif p.name.endswith(".nii.gz"):
            out[p.relative_to(root).as_posix()] = np.asarray(nib.load(p).dataobj).tobytes()
    for p in sorted((root / "labels").rglob("*.nii.gz")):
        out[p.relative_to(root).as_posix()] = np.asarray(nib.load(p).dataobj).tobytes()
    return out


def test_same_seed_same_pixel_bytes_other_seed_differs(archive, tmp_path):
    again = build_synthetic_archive(tmp_path / "b", SMALL)
    first, second = _pixels(archive), _pixels(again)
    assert first.keys() == second.keys() and len(first) > 80
    assert all(first[k] == second[k] for k in first)
    other = _pixels(build_synthetic_archive(tmp_path / "c", SynthConfig(**{**SMALL.__dict__, "seed": 1})))
    assert sum(first[k] != other.get(k) for k in first) > len(first) // 2


def test_realistic_tags_and_lossless_compression(archive):
    syntaxes = set()
    for series in sorted((archive / "images" / "ct").glob("*/*")):
        ds = pydicom.dcmread(sorted(series.iterdir())[0])
        syntaxes.add(ds.file_meta.TransferSyntaxUID.name)
        assert ds.Modality == "CT" and ds.RescaleIntercept == -1024 and ds.PatientID.startswith("SYN")
    assert {"RLE Lossless", "JPEG-LS Lossless Image Compression",
            "JPEG 2000 Image Compression (Lossless Only)"} <= syntaxes


def test_classes_are_imbalanced_and_agree_with_the_label_maps(tmp_path):
    root = build_synthetic_archive(tmp_path / "a", SynthConfig(patients=10, mr_patients=0, shape=(12, 40, 40)))
    rows = list(csv.DictReader(open(root / "labels" / "labels.csv")))
    assert [r["label"] for r in rows].count("lesion") == 2  # 1:4
    for row in rows:
        lab = np.asarray(nib.load(root / "labels" / "ct" / f"{row['patient_id']}_seg.nii.gz").dataobj)
        assert (lab == LIVER).sum() > 50
        assert ((lab == LESION).any()) == (row["label"] == "lesion")


def test_label_maps_lie_on_the_ingested_image_grid(archive, tmp_path):
    summary = run_local(ingest_config([archive / "images"], tmp_path / "store"))
    assert summary["failed"] == 0 and summary["volumes"] == 6
    volumes = pq.read_table(tmp_path / "store" / "catalog" / "volumes.parquet").to_pylist()
    for seg in sorted((archive / "labels").rglob("*_seg.nii.gz")):
        pid = seg.name.split("_")[0]
        (vol,) = [v for v in volumes if f"/{pid}" in "/" + v["source_files"][0]]
        lab = nib.load(seg)
        assert tuple(lab.shape) == tuple(vol["shape"][::-1])
        np.testing.assert_allclose(np.reshape(vol["affine"], (4, 4)), lab.affine, atol=1e-3)


def test_dicom_seg_reads_back_with_highdicom(archive):
    import highdicom as hd

    seg_files = sorted((archive / "labels" / "ct").glob("*_seg.dcm"))
    assert len(seg_files) == 3  # patients 0, 2, 4
    for path in seg_files:
        seg = hd.seg.segread(path)
        assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "lesion"]
        pid = path.name.split("_")[0]
        nifti = np.asarray(nib.load(path.with_name(f"{pid}_seg.nii.gz")).dataobj)
        series_uid = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        first = pydicom.dcmread(sorted((archive / "images" / "ct" / pid).rglob("*.dcm"))[0])
        assert series_uid == first.SeriesInstanceUID
        combined = seg.get_volume(combine_segments=True).array
        assert np.bincount(combined.ravel(), minlength=3)[1:3].tolist() == \
            np.bincount(nifti.ravel(), minlength=3)[1:3].tolist()
