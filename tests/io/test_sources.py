"""Folders, zip, tar, tar.gz / tgz and single files give the same volumes."""

from __future__ import annotations

import shutil
import tarfile
import zipfile

import pyarrow.parquet as pq
import pytest

from tests.conftest import NIBABEL_DATA, ingest_config
from voxelflow.ingest import run_local
from voxelflow.io.sources import _safe_member_name, list_inputs
from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series


@pytest.fixture()
def folder(tmp_path):
    src = tmp_path / "export"
    write_ct_series(ct_phantom((5, 24, 24)), src / "study" / "ct", SeriesSpec())
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", src / "fmri.nii.gz")
    return src


def _pack(folder, path):
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                zf.write(f, f.relative_to(folder).as_posix())
    else:
        with tarfile.open(path, "w:gz" if path.name.endswith(("gz", "tgz")) else "w") as tf:
            for f in files:
                tf.add(f, f.relative_to(folder).as_posix())
    return path


def _digests(store):
    rows = pq.read_table(store / "catalog" / "volumes.parquet").to_pylist()
    return sorted((r["digest"], tuple(r["affine"]), tuple(sorted(r["source_files"]))) for r in rows)


@pytest.mark.parametrize("name", ["export.zip", "export.tar", "export.tar.gz", "export.tgz"])
def test_archives_equal_the_folder(tmp_path, folder, name):
    run_local(ingest_config([folder], tmp_path / "from-folder"))
    archive = _pack(folder, tmp_path / name)
    summary = run_local(ingest_config([archive], tmp_path / "from-archive"))
    assert (summary["files"], summary["converted"], summary["volumes"]) == (6, 6, 2)
    assert _digests(tmp_path / "from-archive") == _digests(tmp_path / "from-folder")
    files = pq.read_table(tmp_path / "from-archive" / "catalog" / "files.parquet").to_pylist()
    assert {r["path"] for r in files} == {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}


def test_single_file_source(tmp_path):
    summary = run_local(ingest_config([NIBABEL_DATA / "anatomical.nii"], tmp_path / "store"))
    assert (summary["files"], summary["volumes"]) == (1, 1)
    files = pq.read_table(tmp_path / "store" / "catalog" / "files.parquet").to_pylist()
    assert files[0]["path"] == "anatomical.nii"


def test_same_relative_path_in_two_sources_is_two_rows(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / d / "x.nii")
    entries = list_inputs([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "scratch")
    assert [(e.source.rsplit("/", 1)[-1], e.path) for e in entries] == [("a", "x.nii"), ("b", "x.nii")]


@pytest.mark.parametrize("name,safe", [
    ("a/b.dcm", "a/b.dcm"), ("./a//b.dcm", "a/b.dcm"), ("a/../b.dcm", "b.dcm"),
    ("../b.dcm", None), ("/etc/passwd", None), ("a/../../b", None), ("C:\\x.dcm", None),
    ("..\\..\\x", None),
])
def test_member_names_never_escape(name, safe):
    assert _safe_member_name(name) == safe
