"""The run's listing, accounting by key tally, scan tables in row groups and catalog writes in
sorted slices: what keeps ingest's memory from growing with the archive."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from voxelflow import catalog, ingest, location
from voxelflow.errors import SourceError
from voxelflow.ingest import FileRows, KeyTally, Listing, check_accounting
from voxelflow.io.sources import InputFile, iter_inputs


def _entries(n: int) -> list[InputFile]:
    return [InputFile("src", f"d{i // 10}/f{i:03d}.dcm", f"/x/d{i // 10}/f{i:03d}.dcm", "" if i % 7 else "why")
            for i in range(n)]


def _row(e: InputFile) -> dict:
    return {"source": e.source, "path": e.path, "status": "skipped", "reason": "r", "volume_id": None,
            "digest": None}


def test_listing_reads_any_slice_across_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "LISTING_GROUP", 7)
    entries = _entries(50)
    listing = Listing.write(iter(entries), tmp_path / "listing.parquet")  # an iterator, as found
    assert listing.files == 50
    assert pq.ParquetFile(listing.path).metadata.num_row_groups == 8
    for start, stop in [(0, 50), (3, 9), (6, 8), (7, 14), (13, 29), (49, 50), (20, 20)]:
        assert listing.read(start, stop) == entries[start:stop], (start, stop)
    for size in (None, 16, 1):
        ranges = listing.batches(size)
        assert ranges[0][0] == 0 and ranges[-1][1] == 50
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert len(ranges) <= ingest.MAX_TASKS
    assert [b - a for a, b in listing.batches(16)] == [16, 16, 16, 2]
    assert ingest.load_batch(ingest.dump_batch(listing, 12, 20)) == entries[12:20]
    empty = Listing.write(iter([]), tmp_path / "empty.parquet")
    assert (empty.files, empty.batches(), empty.read()) == (0, [], [])


def test_key_tally_is_order_free_and_sees_missing_extra_and_duplicate_keys():
    def tally(keys):
        t = KeyTally()
        t.add([s for s, _ in keys], [p for _, p in keys])
        return t

    keys = [("a", "x"), ("a", "y"), ("b", "x")]
    assert tally(keys) == tally(keys[::-1])
    assert tally(keys) != tally(keys[:2])  # missing
    assert tally(keys) != tally(keys + [("c", "z")])  # extra
    assert tally(keys) != tally(keys[:2] + [keys[0]])  # one duplicated, one missing: same count
    assert tally([("a", "x"), ("b", "y")]) != tally([("a", "y"), ("b", "x")])  # keys, not columns
    table = pa.table({"source": [s for s, _ in keys], "path": [p for _, p in keys]})
    assert KeyTally().add_table(table) == tally(keys)


def test_accounting_against_the_listing(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "LISTING_GROUP", 4)
    entries = _entries(30)
    listing = Listing.write(iter(entries), tmp_path / "listing.parquet")
    rows = [_row(e) for e in entries]
    files = FileRows(rows[:10])
    files.add_table(pa.Table.from_pylist(rows[10:], schema=ingest.FILE_ROW_SCHEMA))
    check_accounting(listing, files)
    with pytest.raises(RuntimeError, match=r"missing \[\('src', 'd2/f029.dcm'\)\]"):
        check_accounting(listing, FileRows(rows[:-1]))
    with pytest.raises(RuntimeError, match="1 duplicate rows"):
        check_accounting(listing, FileRows(rows[:-1] + rows[:1]))
    with pytest.raises(RuntimeError, match=r"unexpected \[\('src', 'extra'\)\]"):
        check_accounting(listing, FileRows(rows + [_row(InputFile("src", "extra", ""))]))


def test_inputs_are_listed_as_they_are_found(tmp_path):
    """The sources are walked lazily: a folder's files come out before a later source is
    even looked at (here, one that does not exist)."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ("b.dcm", "a.dcm", "sub/c.dcm"):
        (tmp_path / "a" / name).write_bytes(b"x")
    (tmp_path / "a" / "dangling").symlink_to(tmp_path / "nowhere")
    found = iter_inputs([str(tmp_path / "a"), str(tmp_path / "missing")], tmp_path / "scratch")
    first = [next(found) for _ in range(4)]
    assert [(e.path, e.reason) for e in first] == [("a.dcm", ""), ("b.dcm", ""), ("dangling", "broken symbolic link"),
                                                   ("sub/c.dcm", "")]
    assert first[0].local == str(tmp_path / "a" / "a.dcm")
    with pytest.raises(SourceError, match="does not exist"):
        next(found)


def test_job_rows_as_runs():
    assert ingest._runs([5, 3, 4, 9, 10, 20, 4]) == [[3, 6], [9, 11], [20, 21]]
    assert ingest._rows([[3, 6], [9, 11], [20, 21]]).tolist() == [3, 4, 5, 9, 10, 20]
    assert ingest._runs([]) == [] and ingest._rows([]).tolist() == []


def test_scan_tables_and_job_records_read_back_in_row_groups(tmp_path, monkeypatch):
    """A scan batch is written a row group at a time; a job's records are the rows its runs
    name, whichever scan tables they are in."""
    monkeypatch.setattr(ingest, "LISTING_GROUP", 3)
    entries = []
    for i in range(8):
        f = tmp_path / "in" / f"note{i}.txt"
        f.parent.mkdir(exist_ok=True)
        f.write_text(f"not an image {i}")
        entries.append(InputFile("in", f.name, str(f)))
    first = ingest.scan_batch(entries[:5], b"k" * 32, str(tmp_path / "scan" / "0.parquet"))
    second = ingest.scan_batch(entries[5:], b"k" * 32, str(tmp_path / "scan" / "1.parquet"))
    assert pq.ParquetFile(first).metadata.num_row_groups == 2
    assert pq.read_table(first)["path"].to_pylist() == [e.path for e in entries[:5]]
    job = {"kind": "dicom", "series": "s", "n": 4, "refs": [[first, [[1, 2], [3, 5]]], [second, [[2, 3]]]]}
    records = ingest.job_records(job, ["path", "status", "reason"])
    assert [r["path"] for r in records] == ["note1.txt", "note3.txt", "note4.txt", "note7.txt"]
    assert {r["reason"] for r in records} == {"not a DICOM or NIfTI file"}


def test_catalog_written_in_sorted_slices(tmp_path):
    """Rows are written in key order a slice at a time, and merged over an earlier catalog."""
    rows = [{"source": "s", "path": f"p{i:02d}", "status": "converted", "reason": None, "volume_id": "v",
             "digest": f"d{i}"} for i in (7, 3, 9, 1, 0, 5, 8, 2, 6, 4)]
    table = pa.Table.from_pylist(rows, schema=catalog.FILE_SCHEMA)
    merged, order = catalog.merge_order(catalog.FILE_SCHEMA.empty_table(), table, catalog.FILE_SCHEMA,
                                        ("source", "path"))
    location.write_parquet(merged, tmp_path / "files.parquet", row_group=3, order=order)
    back = pq.read_table(tmp_path / "files.parquet")
    assert pq.ParquetFile(tmp_path / "files.parquet").metadata.num_row_groups == 4
    assert back["path"].to_pylist() == [f"p{i:02d}" for i in range(10)]
    assert back.equals(table.sort_by([("source", "ascending"), ("path", "ascending")]))
    store = tmp_path / "store"
    catalog.update_catalog(store, [], table.slice(0, 6))
    newer = [r | {"digest": "new"} for r in rows[4:]]  # p00 p05 p08 p02 p06 p04 again, changed
    catalog.update_catalog(store, [], FileRows(newer))
    files = catalog.read_table(store, "files")
    assert files["path"].to_pylist() == [f"p{i:02d}" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert dict(zip(files["path"].to_pylist(), files["digest"].to_pylist())) == {
        "p00": "new", "p01": "d1", "p02": "new", "p03": "d3", "p04": "new", "p05": "new", "p06": "new",
        "p07": "d7", "p08": "new", "p09": "d9"}
