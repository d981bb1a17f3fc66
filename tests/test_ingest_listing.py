"""The run's listing, accounting by key tally, scan tables in row groups, the run's rows in
sorted parts and the catalog written by a streaming merge: what keeps ingest's memory from
growing with the archive."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from voxelflow import catalog, ingest, location, sorted_parquet
from voxelflow.errors import DuplicateKeyError, SourceError
from voxelflow.ingest import KeyTally, Listing, RunRows, check_accounting
from voxelflow.io.sources import InputFile, iter_inputs


def _entries(n: int) -> list[InputFile]:
    return [InputFile("src", f"d{i // 10}/f{i:03d}.dcm", f"/x/d{i // 10}/f{i:03d}.dcm", "" if i % 7 else "why")
            for i in range(n)]


def _row(e: InputFile) -> dict:
    return {"source": e.source, "path": e.path, "status": "skipped", "reason": "r", "volume_id": None,
            "digest": None}


def test_listing_reads_any_slice_across_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest.listing, "LISTING_GROUP", 7)
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
    assert list(ingest.load_batch(ingest.dump_batch(listing, 12, 20))) == entries[12:20]
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
    monkeypatch.setattr(ingest.listing, "LISTING_GROUP", 4)
    entries = _entries(30)
    listing = Listing.write(iter(entries), tmp_path / "listing.parquet")
    rows = [_row(e) for e in entries]

    def run_rows(name, *parts):
        out = RunRows(tmp_path / name)
        for part in parts:
            out.add("files", part)
        return out

    check_accounting(listing, run_rows("ok", rows[:10], pa.Table.from_pylist(rows[10:], schema=ingest.FILE_ROW_SCHEMA)))
    with pytest.raises(RuntimeError, match=r"missing \[\('src', 'd2/f029.dcm'\)\]"):
        check_accounting(listing, run_rows("missing", rows[:-1]))
    with pytest.raises(RuntimeError, match="1 duplicate rows"):
        check_accounting(listing, run_rows("dup", rows[:-1], rows[:1]))
    with pytest.raises(RuntimeError, match=r"unexpected \[\('src', 'extra'\)\]"):
        check_accounting(listing, run_rows("extra", rows + [_row(InputFile("src", "extra", ""))]))


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
    from voxelflow.ingest.plan import _rows, _runs

    assert _runs([5, 3, 4, 9, 10, 20, 4]) == [[3, 6], [9, 11], [20, 21]]
    assert _rows([[3, 6], [9, 11], [20, 21]]).tolist() == [3, 4, 5, 9, 10, 20]
    assert _runs([]) == [] and _rows([]).tolist() == []


def test_scan_tables_and_job_records_read_back_in_row_groups(tmp_path, monkeypatch):
    """A scan batch is written a row group at a time; a job's records are the rows its runs
    name, whichever scan tables they are in."""
    monkeypatch.setattr(ingest.scan, "SCAN_GROUP", 3)
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


def _file_rows(keys, digest="d") -> list[dict]:
    return [{"source": src, "path": path, "status": "converted", "reason": None, "volume_id": f"v{path}",
             "digest": digest} for src, path in keys]


def _part(tmp_path, name, rows) -> str:
    return ingest.write_rows(rows, "files", tmp_path / f"{name}.parquet")


def test_sorted_merge_equals_an_in_memory_merge(tmp_path):
    """A k-way merge a few rows at a time over sorted parts and an earlier table gives the
    same rows as merging everything in memory: sorted by key, newer rows replacing older."""
    rng = np.random.default_rng(0)
    keys = [(f"s{rng.integers(3)}", f"p{i:04d}") for i in rng.permutation(600)]
    old = pa.Table.from_pylist(_file_rows(keys[:400], "old"), schema=catalog.FILE_SCHEMA)
    base = tmp_path / "old.parquet"
    location.write_parquet(catalog.merge(catalog.FILE_SCHEMA.empty_table(), old, catalog.FILE_SCHEMA,
                                         ("source", "path")), base, row_group=37)
    # three parts of a run: some keys new, some replacing old ones; uneven sizes
    new_keys = keys[300:]
    parts = [_part(tmp_path, f"part{i}", _file_rows(new_keys[i::3][: 20 + 60 * i], f"new{i}")) for i in range(3)]
    new = pa.concat_tables([pq.read_table(p) for p in parts])
    merged = pa.concat_tables(list(sorted_parquet.merge_sorted([base, *parts], catalog.FILE_SCHEMA, ("source", "path"),
                                                        base=True, batch_bytes=2000)))
    expected = catalog.merge(old, new, catalog.FILE_SCHEMA, ("source", "path"))
    assert merged.drop_columns(["_rank"]).equals(expected)
    assert merged.num_rows == 400 + sum(1 for k in {(r["source"], r["path"]) for r in new.to_pylist()}
                                        if k not in set(keys[:400]))
    # rank: 0 for rows kept from the earlier table
    kept = merged.filter(pa.compute.equal(merged["_rank"], 0))
    assert set(kept["digest"].to_pylist()) == {"old"}


def test_sorted_merge_refuses_duplicates_and_unsorted_sources(tmp_path):
    one = _part(tmp_path, "one", _file_rows([("s", "a"), ("s", "b")]))
    two = _part(tmp_path, "two", _file_rows([("s", "b"), ("s", "c")]))
    with pytest.raises(DuplicateKeyError, match=r"\('s', 'b'\)"):
        list(sorted_parquet.merge_sorted([one, two], catalog.FILE_SCHEMA, ("source", "path")))
    assert len(list(sorted_parquet.merge_sorted([one, two], catalog.FILE_SCHEMA, ("source", "path"), base=True))) >= 1
    unsorted = tmp_path / "unsorted.parquet"
    pq.write_table(pa.Table.from_pylist(_file_rows([("s", "z"), ("s", "a")]), schema=catalog.FILE_SCHEMA), unsorted)
    assert not sorted_parquet.is_sorted(unsorted, ("source", "path")) and sorted_parquet.is_sorted(one, ("source", "path"))
    with pytest.raises(ValueError, match="not sorted"):
        list(sorted_parquet.merge_sorted([unsorted, one], catalog.FILE_SCHEMA, ("source", "path"), base=True))


def test_run_rows_compact_in_levels_and_count_as_they_come(tmp_path, monkeypatch):
    """Parts are merged FANIN at a time into parts of the next level: the parts on disk stay
    few, every row is kept once, and the counts are those of all rows added."""
    monkeypatch.setattr(RunRows, "FANIN", 3)
    monkeypatch.setattr(sorted_parquet, "PART_GROUP", 5)
    rows = RunRows(tmp_path / "run")
    keys = [("s", f"f{i:03d}") for i in np.random.default_rng(1).permutation(100)]
    for i in range(0, 100, 4):  # 25 parts
        part = _file_rows(keys[i:i + 4])
        part[0] |= {"status": "skipped", "reason": f"reason {i % 3}", "volume_id": None}
        rows.add("files", part)
    levels = rows.levels("files")
    assert levels == [0, 1, 1, 2, 2]  # 25 = 2*9 + 2*3 + 1
    assert len(list((tmp_path / "run").glob("*.parquet"))) == 5
    assert len(rows.parts("files")) == 3  # at most FANIN for the catalog merge: the lowest merged
    assert len(list((tmp_path / "run").glob("*.parquet"))) == 3
    back = pa.concat_tables(list(rows.tables("files")))
    assert sorted(back["path"].to_pylist()) == sorted(p for _, p in keys)
    for path in rows.parts("files"):
        assert sorted_parquet.is_sorted(path, ("source", "path"))
    summary = rows.summary()
    assert (summary["files"], summary["converted"], summary["skipped"]) == (100, 75, 25)
    assert summary["top_reasons"][0] == {"files": 9, "status": "skipped", "reason": "reason 0"}
    assert rows.tally == KeyTally().add_table(back)


def test_catalog_update_streams_parts_over_the_catalog(tmp_path, monkeypatch):
    """update_catalog merges sorted parts over the catalog in key order, a new row replacing
    the old one; it counts earlier rows of the run's sources it has no row for (gone), and
    merges a catalog edited out of order through a sorted copy."""
    store = tmp_path / "store"
    first = [("a", f"p{i:02d}") for i in (7, 3, 9, 1, 0, 5, 8, 2, 6, 4)] + [("b", "q1")]
    gone = catalog.update_catalog(store, [], [_part(tmp_path, "first", _file_rows(first, "d1"))], ["a", "b"])
    assert gone == 0
    files = catalog.read_table(store, "files")
    assert list(zip(files["source"].to_pylist(), files["path"].to_pylist())) == sorted(first)
    again = [("a", f"p{i:02d}") for i in (0, 5, 8, 2, 6)] + [("a", "p10")]
    parts = [_part(tmp_path, "again1", _file_rows(again[:3], "d2")), _part(tmp_path, "again2", _file_rows(again[3:], "d2"))]
    gone = catalog.update_catalog(store, [], parts, ["a"])
    assert gone == 5  # p01 p03 p04 p07 p09; b's q1 is from another source
    files = catalog.read_table(store, "files")
    assert files["path"].to_pylist() == [f"p{i:02d}" for i in range(11)] + ["q1"]
    assert {p: d for p, d in zip(files["path"].to_pylist(), files["digest"].to_pylist())} == \
        {f"p{i:02d}": "d2" if i in (0, 2, 5, 6, 8, 10) else "d1" for i in range(11)} | {"q1": "d1"}
    # a catalog rewritten out of order (by hand) is merged all the same
    target = catalog.catalog_dir(store) / "files.parquet"
    pq.write_table(files.take(np.arange(files.num_rows)[::-1]), target)
    catalog.update_catalog(store, [], [_part(tmp_path, "third", _file_rows([("a", "p00")], "d3"))])
    back = catalog.read_table(store, "files")
    assert back["path"].to_pylist() == files["path"].to_pylist()
    assert back["digest"].to_pylist()[0] == "d3"


def test_parquet_stream_cuts_row_groups_by_rows_and_bytes(tmp_path):
    table = pa.table({"x": pa.array(np.arange(1000)), "s": pa.array(["y" * 100] * 1000)})
    pieces = (table.slice(i, 70) for i in range(0, 1000, 70))
    assert location.write_parquet_stream(pieces, table.schema, tmp_path / "a.parquet", row_group=300) == 1000
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [300, 300, 300, 100]
    assert pq.read_table(tmp_path / "a.parquet").equals(table)
    pieces = (table.slice(i, 70) for i in range(0, 1000, 70))
    location.write_parquet_stream(pieces, table.schema, tmp_path / "b.parquet", row_group=10_000, group_bytes=20_000)
    meta = pq.ParquetFile(tmp_path / "b.parquet").metadata
    # groups of about 20 kB: 178 rows of 112 bytes
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [178] * 5 + [110]
    assert pq.read_table(tmp_path / "b.parquet").equals(table)


def test_conversion_hands_rows_over_a_chunk_at_a_time(tmp_path, monkeypatch):
    """A conversion batch is converted CONVERT_CHUNK files at a time (a series is never
    split), each chunk reading only its own scan rows; the store is the same."""
    from voxelflow.ingest import IngestConfig, run_local
    from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series

    for i in range(3):
        write_ct_series(ct_phantom((4, 16, 16), seed=i), tmp_path / "src" / f"s{i}",
                        SeriesSpec(series_number=i + 1, series_uid=f"1.2.3.{i}"))
    from voxelflow.ingest import convert, plan

    groups = []
    real = convert._convert_group

    def counting(store, key, jobs, *args):
        groups.append(sum(j["n"] for j in jobs))
        return real(store, key, jobs, *args)

    monkeypatch.setattr(convert, "_convert_group", counting)
    monkeypatch.setattr(plan, "MAX_TASKS", 1)  # one conversion batch of 3 series
    monkeypatch.setattr(convert, "CONVERT_CHUNK", 6)
    summary = run_local(IngestConfig(sources=[str(tmp_path / "src")], store=str(tmp_path / "a")))
    assert sorted(groups) == [4, 4, 4] and (summary["volumes"], summary["converted"]) == (3, 12)
    monkeypatch.setattr(convert, "CONVERT_CHUNK", 1024)
    groups.clear()
    run_local(IngestConfig(sources=[str(tmp_path / "src")], store=str(tmp_path / "b")))
    assert groups == [12]
    # the same catalog (ids differ: each store has its own de-identification key)
    columns = {"volumes": ["shape", "spacing", "affine", "n_files", "dtype"], "files": ["source", "path", "status"]}
    for name, cols in columns.items():
        a, b = (catalog.read_table(tmp_path / s, name).select(cols) for s in "ab")
        assert sorted(map(str, a.to_pylist())) == sorted(map(str, b.to_pylist())) and a.num_rows in (3, 12)


def test_run_rows_keep_the_most_frequent_reasons_when_there_are_too_many(tmp_path, monkeypatch):
    """Failure reasons name their file, so an archive of broken files has one per file: past
    2 x REASONS distinct ones, only the most frequent REASONS are kept (the top ten exact)."""
    monkeypatch.setattr(RunRows, "REASONS", 3)
    rows = RunRows(tmp_path / "run")
    n = 0
    for reason, count in [("common", 5), ("often", 4)] + [(f"once {i}", 1) for i in range(6)]:
        rows.add("files", [{"source": "s", "path": f"f{n + k}", "status": "failed", "reason": reason,
                            "volume_id": None, "digest": None} for k in range(count)])
        n += count
    assert len(rows.reasons) <= 2 * 3
    top = rows.summary()["top_reasons"]
    assert top[:2] == [{"files": 5, "status": "failed", "reason": "common"},
                       {"files": 4, "status": "failed", "reason": "often"}]
    assert rows.summary()["failed"] == n == 15
