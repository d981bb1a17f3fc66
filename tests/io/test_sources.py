"""Folders, zip, tar, tar.gz / tgz and single files give the same volumes."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import NIBABEL_DATA, ingest_config
from voxelflow.ingest import run_local
from voxelflow.io.sources import ArchiveLimits, _safe_member_name, list_inputs
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


def test_a_source_named_twice_is_read_once(tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "a" / "x.nii")
    summary = run_local(ingest_config([tmp_path / "a", tmp_path / "a"], tmp_path / "store"))
    assert (summary["files"], summary["volumes"]) == (1, 1)


def test_members_of_one_name_are_each_accounted_and_the_first_is_kept(tmp_path):
    """Zip and tar files may hold several members of one name (or of names equal once
    normalised): the first is unpacked, each later one has its own row with why it was not
    (it would have overwritten the first); a member named like a folder does not stop the rest."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names
        with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
            for name, data in [("x.txt", "one"), ("x.txt", "two"), ("d/y.txt", "y1"), ("./d/y.txt", "y2"),
                               ("d//y.txt", "y3"), ("../x.txt", "out"), ("../x.txt", "out2"), ("x.txt/z", "z"),
                               ("e.txt", "e")]:
                zf.writestr(name, data)
    with tarfile.open(tmp_path / "b.tar", "w") as tf:
        for data in (b"one", b"two"):
            info = tarfile.TarInfo("x.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    entries = list_inputs([str(tmp_path / "a.zip"), str(tmp_path / "b.tar")], tmp_path / "scratch")
    keys = [(Path(e.source).name, e.path) for e in entries]
    assert len(keys) == len(set(keys)) == 11  # 9 zip members, 2 tar members
    by_key = {(Path(e.source).name, e.path): e for e in entries}
    assert Path(by_key["a.zip", "x.txt"].local).read_text() == "one"
    assert Path(by_key["b.tar", "x.txt"].local).read_text() == "one"
    assert Path(by_key["a.zip", "d/y.txt"].local).read_text() == "y1"
    assert Path(by_key["a.zip", "e.txt"].local).read_text() == "e"
    for key in [("a.zip", "x.txt#2"), ("a.zip", "d/y.txt#2"), ("a.zip", "d/y.txt#3"), ("b.tar", "x.txt#2"),
                ("a.zip", "../x.txt#2")]:
        assert not by_key[key].local and "only the first one is unpacked" in by_key[key].reason, key
    assert "escapes" in by_key["a.zip", "../x.txt"].reason
    assert by_key["a.zip", "x.txt/z"].reason.startswith("cannot extract archive member")
    summary = run_local(ingest_config([tmp_path / "a.zip", tmp_path / "b.tar"], tmp_path / "store"))
    assert summary["files"] == 11


@pytest.mark.parametrize("name,safe", [
    ("a/b.dcm", "a/b.dcm"), ("./a//b.dcm", "a/b.dcm"), ("a/../b.dcm", "b.dcm"),
    ("../b.dcm", None), ("/etc/passwd", None), ("a/../../b", None), ("C:\\x.dcm", None),
    ("..\\..\\x", None),
])
def test_member_names_never_escape(name, safe):
    assert _safe_member_name(name) == safe


# ----------------------------------------------------------------- hardened archives


def test_nested_archives_are_unpacked_and_equal_the_folder(tmp_path, folder):
    """A tar.gz inside a zip inside the source: its files are inputs named through the
    archives, and the volumes equal the folder's."""
    run_local(ingest_config([folder], tmp_path / "from-folder"))
    inner = _pack(folder, tmp_path / "inner.tar.gz")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "batch1/inner.tar.gz")
    summary = run_local(ingest_config([outer], tmp_path / "from-nested"))
    assert (summary["files"], summary["converted"], summary["volumes"]) == (6, 6, 2)
    assert [d[:2] for d in _digests(tmp_path / "from-nested")] == [d[:2] for d in _digests(tmp_path / "from-folder")]
    paths = {r["path"] for r in pq.read_table(tmp_path / "from-nested" / "catalog" / "files.parquet").to_pylist()}
    assert "batch1/inner.tar.gz/fmri.nii.gz" in paths


def test_archives_nested_too_deep_are_reported(tmp_path):
    level = tmp_path / "a.txt"
    level.write_text("deep")
    for k in range(3):  # a.txt in zip0 in zip1 in zip2
        z = tmp_path / f"zip{k}.zip"
        with zipfile.ZipFile(z, "w") as zf:
            zf.write(level, level.name)
        level = z
    entries = list_inputs([str(level)], tmp_path / "scratch", ArchiveLimits(depth=1))
    assert [(e.path, e.local, e.reason) for e in entries] == [
        ("zip1.zip/zip0.zip", "", "archive nested deeper than 1 levels; not unpacked")]
    entries = list_inputs([str(level)], tmp_path / "scratch2", ArchiveLimits(depth=2))
    assert [e.path for e in entries] == ["zip1.zip/zip0.zip/a.txt"] and entries[0].local


def test_decompression_bombs_are_refused_and_nothing_partial_is_left(tmp_path):
    """A zip member packing 64 MB of zeros into a few kB is refused from its declared sizes;
    a tar member larger than the per-member limit is cut off while streaming and removed;
    an archive over its total budget stops there. Good members next to them still unpack."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * (64 << 20))
        zf.writestr("fine.txt", b"ok")
    entries = {e.path: e for e in list_inputs([str(bomb)], tmp_path / "s1")}
    assert "decompression bomb guard: member packs 67108864 bytes into" in entries["zeros.dcm"].reason
    assert entries["fine.txt"].local and not entries["zeros.dcm"].local

    big = tmp_path / "big.tar.gz"
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"x" * 5000)
    with tarfile.open(big, "w:gz") as tf:
        tf.add(payload, "big.dcm")
        tf.add(tmp_path / "payload.bin", "second.dcm")
    limits = ArchiveLimits(member_bytes=4096, total_bytes=1 << 20)
    entries = {e.path: e for e in list_inputs([str(big)], tmp_path / "s2", limits)}
    assert "more than 4096 bytes (limit per member)" in entries["big.dcm"].reason
    assert not list((tmp_path / "s2").rglob("big.dcm"))  # the partial file is gone
    limits = ArchiveLimits(member_bytes=1 << 20, total_bytes=6000)
    entries = {e.path: e for e in list_inputs([str(big)], tmp_path / "s3", limits)}
    assert entries["big.dcm"].local and "limit per archive" in entries["second.dcm"].reason
    # nothing was written outside the scratch folders
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["bomb.zip", "big.tar.gz", "payload.bin", "s1", "s2", "s3"])


def test_an_archive_inside_a_folder_source_is_unpacked(tmp_path, folder):
    run_local(ingest_config([folder], tmp_path / "from-folder"))
    outer = tmp_path / "outer"
    outer.mkdir()
    _pack(folder, outer / "export.zip")
    (outer / "notes.txt").write_text("readme")
    summary = run_local(ingest_config([outer], tmp_path / "store"))
    assert (summary["files"], summary["converted"], summary["skipped"], summary["volumes"]) == (7, 6, 1, 2)
    assert [d[:2] for d in _digests(tmp_path / "store")] == [d[:2] for d in _digests(tmp_path / "from-folder")]
    assert (outer / "export.zip").exists()  # the user's archive is read, never touched
