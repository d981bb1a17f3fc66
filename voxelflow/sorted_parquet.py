"""Parquet tables sorted by a key, at any size: parts written sorted, a k-way merge that streams
them a batch at a time (later sources replacing earlier rows of the same key), and parts
compacted in levels as in a log-structured merge tree, so that a run of 10^6 rows never holds
them in memory and a merge never opens more than a few dozen files. Every write goes through
``location``'s atomic replace. The catalog (``voxelflow.catalog``) and an ingest run's rows
(``voxelflow.ingest.rows``) are built on it."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from voxelflow import location
from voxelflow.errors import DuplicateKeyError

# Rows and bytes per row group of a part at most: what a merge reads of a part at once.
PART_GROUP = 1024
PART_BYTES = 256 << 10


def sort_by(table: pa.Table, key: tuple[str, ...]) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in key]))


def write_part(rows: list[dict] | pa.Table, schema: pa.Schema, key: tuple[str, ...],
               out_path: str | os.PathLike) -> str:
    """``rows`` (dicts or a table) as a Parquet part in ``schema`` sorted by ``key``, written
    atomically; returns its path."""
    table = conform(rows, schema) if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    with location.replacing(Path(out_path)) as tmp:
        pq.write_table(sort_by(table, key), tmp, row_group_size=PART_GROUP)
    return str(out_path)


def _key_at(table: pa.Table, key: tuple[str, ...], row: int) -> tuple:
    return tuple(table[k][row].as_py() for k in key)


def _at_most(table: pa.Table, key: tuple[str, ...], bound: tuple):
    """Rows whose key is at most ``bound``, lexicographically over the key's columns (the byte
    order Arrow sorts strings in, which is Python's order)."""
    mask = None
    for name, value in reversed(list(zip(key, bound))):
        col = table[name]
        mask = pc.less_equal(col, value) if mask is None else \
            pc.or_(pc.less(col, value), pc.and_(pc.equal(col, value), mask))
    return mask


def _same_as_next(table: pa.Table, key: tuple[str, ...]):
    """Per row but the last: whether the next row has the same key."""
    head, tail = table.slice(0, table.num_rows - 1), table.slice(1)
    same = None
    for name in key:
        eq = pc.equal(head[name], tail[name])
        same = eq if same is None else pc.and_(same, eq)
    return same


def is_sorted(source: Any, key: tuple[str, ...], batch_rows: int = 65536) -> bool:
    """Whether a Parquet file's rows are in ascending key order, read a batch of key columns
    at a time."""
    last = None
    for batch in _parquet(source).iter_batches(batch_size=batch_rows, columns=list(key)):
        table = pa.Table.from_batches([batch])
        if not _in_order(table, key, last):
            return False
        last = _key_at(table, key, table.num_rows - 1) if table.num_rows else last
    return True


def _in_order(table: pa.Table, key: tuple[str, ...], after: tuple | None) -> bool:
    """Whether the rows are in ascending key order, none below ``after`` (the key before them)."""
    if not table.num_rows:
        return True
    if after is not None and _key_at(table, key, 0) < after:
        return False
    return _ordered(table, key)


def _ordered(table: pa.Table, key: tuple[str, ...]) -> bool:
    """Whether the table's rows are in ascending key order."""
    if table.num_rows < 2:
        return True
    head, tail = table.slice(0, table.num_rows - 1), table.slice(1)
    le = None
    for name in reversed(key):
        x, y = head[name], tail[name]
        le = pc.less_equal(x, y) if le is None else pc.or_(pc.less(x, y), pc.and_(pc.equal(x, y), le))
    return bool(pc.all(le).as_py())


def _parquet(source: Any) -> pq.ParquetFile:
    if location.is_url(source):
        return pq.ParquetFile(location.path(source).open("rb"))
    return pq.ParquetFile(source)


class _Stream:
    """One sorted source of a merge: the rows of its current batch not yet merged."""

    def __init__(self, source: Any, rank: int, schema: pa.Schema, key: tuple[str, ...], batch_bytes: int):
        self.source, self.rank, self.schema, self.key = source, rank, schema, key
        pf = _parquet(source)
        meta = pf.metadata
        # rows of about ``batch_bytes`` (a volume row lists its files: a few kB to 100s of kB)
        row_bytes = max(1, sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
                        // max(1, meta.num_rows))
        self._batches = pf.iter_batches(batch_size=int(min(4096, max(1, batch_bytes // row_bytes))))
        self.rows = schema.empty_table()
        self._last: tuple | None = None

    def fill(self) -> bool:
        """Read the next batch when the current one is used up; False at the end."""
        while not self.rows.num_rows:
            batch = next(self._batches, None)
            if batch is None:
                return False
            table = conform(pa.Table.from_batches([batch]), self.schema)
            if not _in_order(table, self.key, self._last):
                raise ValueError(f"{self.source}: rows are not sorted by {', '.join(self.key)}")
            self.rows = table
            if table.num_rows:
                self._last = _key_at(table, self.key, table.num_rows - 1)
        return True

    def last(self) -> tuple:
        return _key_at(self.rows, self.key, self.rows.num_rows - 1)

    def take_upto(self, bound: tuple) -> pa.Table:
        """Its rows with keys up to ``bound`` (a prefix: the rows are sorted), marked with its rank."""
        n = int(pc.sum(_at_most(self.rows, self.key, bound)).as_py() or 0)
        head, self.rows = self.rows.slice(0, n), self.rows.slice(n)
        return head.append_column("_rank", pa.array(np.full(n, self.rank, dtype=np.int32)))


def merge_sorted(sources: list[Any], schema: pa.Schema, key: tuple[str, ...], *, base: bool = False,
                 batch_bytes: int = 128 << 10) -> Iterator[pa.Table]:
    """Merge Parquet files whose rows are each sorted by ``key`` into one key-ordered stream,
    holding one batch of about ``batch_bytes`` per source (a k-way merge a batch at a time).

    Yields tables in ``schema`` plus ``_rank``, the index of the source each row came from.
    With ``base``, the first source is an earlier table whose rows the others replace (the
    catalog a run updates); keys must otherwise be unique.

    Raises:
        DuplicateKeyError: two rows of the sources that must be unique share a key.
        ValueError: a source is not sorted by ``key``.
    """
    streams = [s for s in (_Stream(src, rank, schema, key, batch_bytes) for rank, src in enumerate(sources))
               if s.fill()]
    order = [(k, "ascending") for k in key] + [("_rank", "ascending")]
    while streams:
        # Every row up to the smallest of the batches' last keys is here: no source can hold
        # a smaller key further on.
        bound = min(s.last() for s in streams)
        pieces = [s.take_upto(bound) for s in streams]
        merged = pa.concat_tables([p for p in pieces if p.num_rows])
        merged = merged.take(pc.sort_indices(merged, sort_keys=order))
        if merged.num_rows > 1:
            same = _same_as_next(merged, key)
            if pc.any(same).as_py():
                rank = merged["_rank"].slice(0, merged.num_rows - 1)
                clash = pc.and_(same, pc.not_equal(rank, 0)) if base else same
                if pc.any(clash).as_py():
                    row = pc.index(clash, True).as_py()
                    raise DuplicateKeyError(f"two rows for {_key_at(merged, key, row)} "
                                            f"(in {sources[merged['_rank'][row].as_py()]} and "
                                            f"{sources[merged['_rank'][row + 1].as_py()]})")
                # an earlier row replaced by a newer one of the same key
                merged = merged.filter(pa.concat_arrays([pc.invert(same).combine_chunks(), pa.array([True])]))
        yield merged
        streams = [s for s in streams if s.rows.num_rows or s.fill()]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``: columns a newer schema added (absent from a catalog written by an
    earlier version) are filled with nulls."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


class SortedParts:
    """Sorted parts of one table in a folder, compacted as they arrive: :data:`FANIN` parts of
    one level are merged (:func:`merge_sorted`) into one part of the next, so each row is
    rewritten a few times at most. ``on_part(table)`` sees every added part's rows, a row
    group at a time (what a caller counts as parts arrive)."""

    FANIN = 8

    def __init__(self, folder: str | os.PathLike, name: str, schema: pa.Schema, key: tuple[str, ...],
                 on_part: Callable[[pa.Table], None] | None = None, fanin: int | None = None):
        self.folder, self.name, self.schema, self.key = Path(folder), name, schema, key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.on_part = on_part
        self.fanin = fanin or self.FANIN
        self._parts: list[tuple[int, str]] = []  # (level, path)
        self._made = 0

    def add(self, rows: list[dict] | pa.Table) -> None:
        """Rows (dicts or a table) as a new part; nothing for no rows."""
        if len(rows):
            self.add_part(write_part(rows, self.schema, self.key, self._new_path()))

    def add_part(self, path: str) -> None:
        """A part written by :func:`write_part` (it becomes this table's: compaction deletes it)."""
        if self.on_part is not None:
            pf = pq.ParquetFile(path)
            for g in range(pf.metadata.num_row_groups):
                self.on_part(pf.read_row_group(g))
        self._parts.append((0, path))
        self._compact()

    def paths(self) -> list[str]:
        """The parts, at most ``fanin`` of them (the lowest levels merged into one first):
        what a merge of them reads at once stays the same whatever the table's size."""
        if len(self._parts) > self.fanin:
            self._parts.sort(key=lambda part: part[0])
            self._merge([path for _, path in self._parts[:len(self._parts) - self.fanin + 1]],
                        self._parts[-1][0] + 1)
        return [path for _, path in self._parts]

    def levels(self) -> list[int]:
        """The compaction level of each part (0: as added)."""
        return sorted(level for level, _ in self._parts)

    def tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The rows of every part, a row group at a time."""
        for path in self.paths():
            pf = pq.ParquetFile(path)
            for g in range(pf.metadata.num_row_groups):
                yield pf.read_row_group(g, columns=columns)

    def _new_path(self) -> str:
        self._made += 1
        return str(self.folder / f"{self.name}-{self._made:06d}.parquet")

    def _compact(self) -> None:
        while True:
            levels = defaultdict(list)
            for level, path in self._parts:
                levels[level].append(path)
            full = [level for level, paths in levels.items() if len(paths) >= self.fanin]
            if not full:
                return
            level = min(full)
            self._merge(levels[level], level + 1)

    def _merge(self, merging: list[str], level: int) -> None:
        """Merge parts into one part of ``level`` (and delete them)."""
        out = self._new_path()
        location.write_parquet_stream((t.drop_columns(["_rank"]) for t in merge_sorted(merging, self.schema, self.key)),
                                      self.schema, out, row_group=PART_GROUP, group_bytes=PART_BYTES)
        for path in merging:
            os.remove(path)
        self._parts[:] = [p for p in self._parts if p[1] not in merging] + [(level, out)]
        release_arrow_memory()


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps for reuse back to the system. pyarrow's
    default pool (mimalloc) keeps freed pages of every Parquet read and write; over a
    10^5-file run that was ~35 MB of resident memory that grew with the archive."""
    pa.default_memory_pool().release_unused()
