"""The demo archive (the README's main command) ingests with the expected outcome."""

from __future__ import annotations

import pyarrow.parquet as pq

from tests.conftest import ingest_config
from voxelflow.demo import build_demo_archive
from voxelflow.export import export_nifti
from voxelflow.ingest import run_local


def test_demo_archive_ingests_and_exports(tmp_path):
    sources = build_demo_archive(tmp_path / "sources", shape=(20, 64, 64))
    summary = run_local(ingest_config(sources, tmp_path / "store"))
    files = pq.read_table(tmp_path / "store" / "catalog" / "files.parquet").to_pylist()
    assert len(files) == summary["files"] == summary["converted"] + summary["skipped"] + summary["failed"]
    by_path = {r["path"]: r for r in files}
    assert by_path["broken/IM_truncated.dcm"]["status"] == "failed"
    assert by_path["corrupt.nii.gz"]["status"] == "failed"
    assert by_path["singles/SC_rgb_rle.dcm"]["status"] == "skipped"
    assert all(r["status"] == "converted" for p, r in by_path.items() if p.startswith(("axial/", "oblique/")))
    volumes = pq.read_table(tmp_path / "store" / "catalog" / "volumes.parquet").to_pylist()
    ct = sorted(tuple(v["shape"]) for v in volumes if v["modality"] == "CT" and v["n_files"] > 5)
    assert ct == [(10, 32, 32), (20, 64, 64)]  # the generated axial and oblique series
    assert len(export_nifti(tmp_path / "store", tmp_path / "nifti")) == summary["volumes"]
