"""Incremental ingest: a re-run converts only what is new or changed, by content (not by
timestamp); deleted files are reported and their volumes kept; the flow on Dask agrees."""

from __future__ import annotations

import base64
import shutil

import pydicom

from tests.conftest import NIBABEL_DATA, ingest_config
from voxelflow import catalog
from voxelflow.ingest import run_local
from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series


def _state(store):
    vols = sorted((r["volume_id"], r["digest"]) for r in catalog.read_table(store, "volumes").to_pylist())
    files = sorted((r["path"], r["status"], r["volume_id"], r["digest"])
                   for r in catalog.read_table(store, "files").to_pylist())
    return vols, files


def test_reruns_convert_only_new_or_changed_content(tmp_path):
    src = tmp_path / "src"
    for k in range(3):
        write_ct_series(ct_phantom((5, 16, 16), seed=k), src / f"s{k}", SeriesSpec(series_number=k + 1))
    shutil.copy(NIBABEL_DATA / "anatomical.nii", src / "anat.nii")
    key = tmp_path / "k.key"
    key.write_bytes(base64.b64encode(bytes(range(32))))

    def ingest(store):
        return run_local(ingest_config([src], store, secret_file=str(key)))

    first = ingest(tmp_path / "store")
    assert (first["volumes"], first["unchanged"]) == (4, 0)
    chunk = next((tmp_path / "store" / "volumes").glob("*/s0/c/0/0/0"))
    written = chunk.stat().st_mtime_ns

    # the same sources again, their timestamps touched: nothing is converted
    for p in src.rglob("*"):
        p.touch()
    again = ingest(tmp_path / "store")
    assert (again["volumes"], again["unchanged"], again["files"]) == (0, 16, 16)
    assert chunk.stat().st_mtime_ns == written
    assert _state(tmp_path / "store")[0] == sorted(
        (r["volume_id"], r["digest"]) for r in catalog.read_table(tmp_path / "store", "volumes").to_pylist())

    # one slice of s1 changed, a new series added, the NIfTI deleted
    f = sorted((src / "s1").glob("*.dcm"))[2]
    ds = pydicom.dcmread(f)
    arr = ds.pixel_array.copy()
    arr[0, 0] += 7
    ds.PixelData = arr.tobytes()
    ds.save_as(f)
    write_ct_series(ct_phantom((4, 16, 16), seed=9), src / "s3", SeriesSpec(series_number=4))
    (src / "anat.nii").unlink()
    third = ingest(tmp_path / "store")
    assert (third["volumes"], third["unchanged"], third["gone"]) == (2, 10, 1)  # s1 and s3; s0, s2 kept

    # the store equals a clean run of today's sources, plus the deleted file's volume (kept)
    ingest(tmp_path / "clean")
    inc_vols, inc_files = _state(tmp_path / "store")
    clean_vols, clean_files = _state(tmp_path / "clean")
    assert set(clean_vols) < set(inc_vols) and len(inc_vols) == len(clean_vols) + 1
    assert set(clean_files) < set(inc_files)
    assert [r for r in inc_files if r not in clean_files][0][0] == "anat.nii"

    # a slice of s2 deleted: s2 is converted again (a file of its volume is gone), nothing else
    sorted((src / "s2").glob("*.dcm"))[0].unlink()
    fourth = ingest(tmp_path / "store")
    assert (fourth["volumes"], fourth["unchanged"], fourth["files"], fourth["gone"]) == (1, 14, 18, 2)


def test_the_flow_skips_unchanged_series(tmp_path, prefect_server):
    from flows.ingest import run_ingest

    src = tmp_path / "src"
    for k in range(2):
        write_ct_series(ct_phantom((5, 16, 16), seed=k), src / f"s{k}", SeriesSpec(series_number=k + 1))
    config = ingest_config([src], tmp_path / "store")
    first = run_ingest(config, n_workers=2)
    second = run_ingest(config, n_workers=2)
    assert (first["volumes"], second["volumes"], second["unchanged"]) == (2, 0, 10)
