"""The command line: exit codes and messages, and a real ingest + export."""

from __future__ import annotations

import nibabel as nib
import pytest

from tests.conftest import NIBABEL_DATA, run_cli
from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series


voxelflow = run_cli


def test_missing_source_exits_2_with_reason(tmp_path):
    proc = voxelflow("ingest", tmp_path / "nope", "--store", tmp_path / "store")
    assert proc.returncode == 2
    assert "source(s) not found" in proc.stderr and "nope" in proc.stderr


def test_unwritable_store_exits_2_with_reason(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "a-file").write_text("x")
    proc = voxelflow("ingest", tmp_path / "src", "--store", tmp_path / "a-file" / "store")
    assert proc.returncode == 2
    assert "cannot create store" in proc.stderr


def test_unreachable_prefect_api_exits_2_with_reason(tmp_path):
    (tmp_path / "src").mkdir()
    proc = voxelflow("ingest", tmp_path / "src", "--store", tmp_path / "store",
                     env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert proc.returncode == 2
    assert "does not answer" in proc.stderr


def test_export_of_a_non_store_exits_2(tmp_path):
    proc = voxelflow("export", tmp_path, tmp_path / "out")
    assert proc.returncode == 2 and "no voxelflow store" in proc.stderr


def test_an_unknown_training_setting_exits_2_naming_it(tmp_path):
    for option in ("--set", "--augment"):
        proc = voxelflow("train", tmp_path, "--version", "v", option, "rotate=3")
        assert proc.returncode == 2, proc.stderr
        assert "unknown" in proc.stderr and "'rotate'" in proc.stderr
        assert ("AugmentConfig" if option == "--augment" else "TrainConfig") in proc.stderr


@pytest.mark.slow
def test_ingest_then_export(tmp_path, prefect_server):
    write_ct_series(ct_phantom((8, 32, 32)), tmp_path / "src" / "ct", SeriesSpec())
    (tmp_path / "src" / "brain.nii").write_bytes((NIBABEL_DATA / "anatomical.nii").read_bytes())
    (tmp_path / "src" / "junk.bin").write_bytes(b"\x00\x01junk")
    proc = voxelflow("ingest", tmp_path / "src", "--store", tmp_path / "store", "--workers", "2",
                     "--json", tmp_path / "summary.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Run in the Prefect UI: http" in proc.stdout
    assert prefect_server.removesuffix("/api") in proc.stdout.replace("\n", "")
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["converted"], summary["skipped"], summary["volumes"]) == (9, 1, 2)
    proc = voxelflow("export", tmp_path / "store", tmp_path / "nifti")
    assert proc.returncode == 0, proc.stderr
    outs = sorted((tmp_path / "nifti").glob("*.nii.gz"))
    assert len(outs) == 2
    assert sorted(nib.load(p).shape for p in outs) == [(32, 32, 8), (33, 41, 25)]


def test_something_missing_from_the_store_is_one_line_and_exit_2(tmp_path):
    from voxelflow.store import init_store

    init_store(tmp_path / "store")
    proc = voxelflow("export-model", tmp_path / "store", "--name", "nosuch")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"voxelflow export-model: error: no model 'nosuch' registered in {tmp_path / 'store'}"
    assert "Traceback" not in proc.stderr
