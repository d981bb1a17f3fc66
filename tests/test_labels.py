"""Labels in the store: segmentations on their image grid (or a clear error), classes joined,
a patient-level split without leakage."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import ingest_config
from voxelflow import catalog, store as st
from voxelflow.errors import LabelError
from voxelflow.ingest import run_local, store_key
from voxelflow.labels import import_classes, import_segmentations, make_split, map_to_grid, read_segmentation
from voxelflow.synth import SynthConfig, build_synthetic_archive


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    archive = build_synthetic_archive(root / "archive", SynthConfig(patients=10, mr_patients=1, shape=(16, 48, 48),
                                                                    dicom_seg_every=3))
    store = root / "store"
    run_local(ingest_config([archive / "images"], store))
    key = store_key(str(store))
    seg_rows, seg_errors = import_segmentations(store, archive / "labels" / "segmentations.csv", key)
    class_rows, class_errors = import_classes(store, archive / "labels" / "labels.csv", key)
    return archive, store, key, seg_rows, seg_errors, class_rows, class_errors


def test_every_segmentation_lands_on_its_volume_exactly(labelled):
    archive, store, _, rows, errors, _, _ = labelled
    assert errors == []
    volumes = catalog.read_table(store, "volumes").to_pylist()
    assert {r["volume_id"] for r in rows} == {v["volume_id"] for v in volumes}  # every volume labelled
    assert sorted({r["mapping"] for r in rows}) == ["identical", "reoriented"]  # DICOM-SEG: other slice order
    for r in rows:
        if r["format"] != "nifti":
            continue
        want = np.transpose(np.asarray(nib.load(archive / "labels" / r["source"]).dataobj), (2, 1, 0))
        np.testing.assert_array_equal(st.open_label(store, r["volume_id"], r["name"])[...], want)


def test_labels_are_ome_zarr_label_images(labelled):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    _, store, _, rows, _, _, _ = labelled
    vid = next(r["volume_id"] for r in rows if r["format"] == "dicom-seg")
    nodes = list(Reader(parse_url(str(st.volume_path(store, vid))))())
    assert any(isinstance(spec, Label) for n in nodes for spec in n.specs), "ome-zarr finds no label image"
    group_props = st.zarr.open_group(str(st.volume_path(store, vid) / "labels" / "segmentation"), mode="r") \
        .attrs["ome"]["image-label"]["properties"]
    assert {p["label-value"]: p["name"] for p in group_props} == {1: "liver", 2: "lesion"}


def test_classes_joined_without_original_uids(labelled):
    archive, store, _, _, _, rows, errors = labelled
    assert errors == [] and len(rows) == 10
    table = pq.read_table(store / "catalog" / "classes.parquet").to_pylist()
    assert sorted(r["label"] for r in table).count("lesion") == 2
    uids = [r["series_instance_uid"] for r in csv.DictReader(open(archive / "labels" / "labels.csv"))]
    for name in ("classes", "labels", "volumes"):
        text = str(pq.read_table(store / "catalog" / f"{name}.parquet").to_pylist())
        assert not any(uid in text for uid in uids)


def test_split_is_patient_level_stratified_and_seeded(labelled):
    _, store, _, _, _, _, _ = labelled
    rows = make_split(store, seed=3)
    volumes = {v["volume_id"]: v for v in catalog.read_table(store, "volumes").to_pylist()}
    per_patient: dict[str, set] = {}
    for r in rows:
        per_patient.setdefault(volumes[r["volume_id"]]["patient_id"] or r["volume_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in per_patient.values())  # no patient in two splits
    classes = {r["volume_id"]: r["label"] for r in catalog.read_table(store, "classes").to_pylist()}
    splits = {r["volume_id"]: r["split"] for r in rows}
    # 8 negatives: each split gets some; 2 positives: they are spread, never both in one place
    neg = [splits[v] for v, c in classes.items() if c == "no_lesion"]
    assert {"train", "validation", "test"} <= set(neg)
    assert make_split(store, seed=3) == rows  # deterministic
    assert make_split(store, seed=4) != rows
    stored = pq.read_table(store / "catalog" / "splits.parquet").to_pylist()
    assert {r["split"] for r in stored} <= {"train", "validation", "test"}


def test_a_kept_split_never_moves_a_patient(labelled):
    """Nightly re-runs: patients split earlier keep their split whatever the seed; patients
    that arrived since are assigned."""
    import pyarrow as pa

    from voxelflow.catalog import SPLIT_SCHEMA

    _, store, _, _, _, _, _ = labelled
    rows = make_split(store, seed=3)
    patients = sorted({r["patient_key"] for r in rows})
    earlier = [r for r in rows if r["patient_key"] in patients[::2]]  # as if half had arrived so far
    catalog.write_table(store, "splits", pa.Table.from_pylist(earlier, schema=SPLIT_SCHEMA))
    again = make_split(store, seed=99, keep_existing=True)
    assert {r["volume_id"] for r in again} == {r["volume_id"] for r in rows}
    new = {r["volume_id"]: r["split"] for r in again}
    assert all(new[r["volume_id"]] == r["split"] for r in earlier)
    assert make_split(store, seed=7, keep_existing=True) == make_split(store, seed=8, keep_existing=True)


# ----------------------------------------------------------------- mismatches


def _grid(shape=(10, 20, 30), spacing=(1.0, 1.0, 2.0), origin=(5.0, -3.0, 7.0)):
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = origin
    labels = np.zeros(shape, np.uint8)
    labels[3:7, 5:15, 10:20] = 1
    return labels, aff


def test_half_voxel_shift_is_resampled_with_a_warning():
    labels, aff = _grid()
    shifted = aff.copy()
    shifted[:3, 3] += [0.5, 0.0, 0.0]
    out, mapping, warnings = map_to_grid(labels, shifted, labels.shape, aff, where="seg.nii")
    assert mapping == "resampled"
    assert any("resampled nearest-neighbour" in w for w in warnings)
    assert set(np.unique(out)) <= {0, 1}


def test_flipped_axes_are_mapped_exactly():
    labels, aff = _grid()
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, labels.shape[2] - 1  # x reversed
    out, mapping, warnings = map_to_grid(labels[:, :, ::-1].copy(), aff @ flip, labels.shape, aff, where="s")
    assert (mapping, warnings) == ("reoriented", [])
    np.testing.assert_array_equal(out, labels)


def test_label_of_another_image_is_an_error():
    labels, aff = _grid()
    far = aff.copy()
    far[:3, 3] += [500.0, 0, 0]
    with pytest.raises(LabelError, match=r"seg\.nii: segmentation grid covers 0% of the image"):
        map_to_grid(labels, far, labels.shape, aff, where="seg.nii")


def test_partial_coverage_is_kept_with_a_warning():
    labels, aff = _grid()
    out, mapping, warnings = map_to_grid(labels[:, :, :20].copy(), aff, labels.shape, aff, where="s")
    assert mapping == "reoriented" and any("covers 67% of the image" in w for w in warnings)
    np.testing.assert_array_equal(out[:, :, :20], labels[:, :, :20])


def test_non_integer_label_map_is_an_error(tmp_path):
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), tmp_path / "prob.nii.gz")
    with pytest.raises(LabelError, match=r"prob\.nii\.gz: label map holds non-integer"):
        read_segmentation(tmp_path / "prob.nii.gz")


def test_mismatched_and_conflicting_segmentations_are_reported(labelled, tmp_path):
    archive, store, key, *_ = labelled
    rows = list(csv.DictReader(open(archive / "labels" / "segmentations.csv")))
    ct = next(r for r in rows if r["segmentation"].endswith(".nii.gz") and not r["image"].startswith("nifti:"))
    img = nib.load(archive / "labels" / ct["segmentation"])
    other = np.asarray(img.dataobj).copy()
    other[other == 2] = 1
    other[:5] = 1  # disagrees with the stored segmentation
    nib.save(nib.Nifti1Image(other, img.affine), tmp_path / "conflict.nii.gz")
    far = img.affine.copy()
    far[:3, 3] += 900
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), far), tmp_path / "elsewhere.nii.gz")
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "segmentation"])
        w.writeheader()
        w.writerows([{"image": ct["image"], "segmentation": "conflict.nii.gz"},
                     {"image": ct["image"], "segmentation": "elsewhere.nii.gz"},
                     {"image": "1.2.3.4.5.6.7", "segmentation": "conflict.nii.gz"}])
    written, errors = import_segmentations(store, manifest, key)
    assert written == []
    assert len(errors) == 3
    assert "conflicts with segmentation ct/" in errors[0]["reason"] and "voxels differ" in errors[0]["reason"]
    assert "covers 0% of the image" in errors[1]["reason"]
    assert "no ingested volume matches" in errors[2]["reason"]


def test_label_pyramid_keeps_small_structures():
    data = np.zeros((2, 4, 4), np.uint8)
    data[0, 0, 0] = 2  # one voxel of 8 in the first block: the majority is background
    data[:, 2:, 2:] = 1
    data[0, 2, 2] = 2
    out = st.downsample_labels(data, (2, 2, 2))
    assert out.tolist() == [[[0, 0], [0, 1]]]
    tie = np.zeros((2, 2, 2), np.uint8)
    tie[0] = 3
    assert st.downsample_labels(tie, (2, 2, 2)).item() == 3  # ties go to the higher label
