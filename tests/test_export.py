"""Exports of stored labels: NIfTI on the volume grid, DICOM-SEG referencing the source images."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from tests.conftest import ingest_config
from voxelflow import catalog, store as st
from voxelflow.export import export_dicom_seg, source_dicom_paths
from voxelflow.ingest import run_local
from voxelflow.labels import map_to_grid, read_segmentation
from voxelflow.phantom import SeriesSpec, ct_phantom, oblique_orientation, write_ct_series


@pytest.fixture()
def ct_store(tmp_path):
    spec = SeriesSpec(orientation=oblique_orientation(12), descending=True)
    write_ct_series(ct_phantom((8, 32, 32)), tmp_path / "src" / "ct", spec)
    run_local(ingest_config([tmp_path / "src"], tmp_path / "store"))
    vid = catalog.read_table(tmp_path / "store", "volumes").to_pylist()[0]["volume_id"]
    label = np.zeros((8, 32, 32), np.uint8)
    label[2:6, 8:20, 10:24] = 1
    label[3:5, 12:16, 14:18] = 3
    st.write_label(tmp_path / "store", vid, "prediction-test", label)
    return tmp_path / "store", vid, label, spec


def test_dicom_seg_export_reads_back_on_the_volume_grid(ct_store, tmp_path):
    import highdicom as hd

    store, vid, label, spec = ct_store
    out = export_dicom_seg(store, vid, "prediction-test", tmp_path / "seg.dcm", {1: "organ", 3: "lesion"})
    seg = hd.seg.segread(out)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["organ", "lesion"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == spec.series_uid
    back, affine, _ = read_segmentation(out)
    vol = st.open_volume(store, vid)
    mapped, mapping, warnings = map_to_grid(back, affine, label.shape, vol.affine, where="seg.dcm")
    assert mapping in ("identical", "reoriented") and warnings == []
    np.testing.assert_array_equal(mapped, np.where(label == 3, 2, label))  # values 1, 3 -> segments 1, 2


def test_source_files_in_slice_order(ct_store):
    store, vid, _, _ = ct_store
    paths = source_dicom_paths(store, vid)
    normal = np.cross(*np.reshape([float(v) for v in pydicom.dcmread(paths[0]).ImageOrientationPatient], (2, 3)))
    positions = [float(np.dot(normal, [float(v) for v in pydicom.dcmread(p).ImagePositionPatient])) for p in paths]
    assert positions == sorted(positions) and len(paths) == 8


def test_moved_sources_are_reported(ct_store, tmp_path):
    import shutil

    store, vid, _, _ = ct_store
    shutil.move(tmp_path / "src", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"source file ct/IM\d+\.dcm of volume .* is not at"):
        source_dicom_paths(store, vid)
