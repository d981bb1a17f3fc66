"""The run's catalog rows on disk: sorted Parquet parts, compacted in levels as in a
log-structured merge tree, counted as they arrive (statuses, reasons, volumes)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from voxelflow import catalog, location
from voxelflow.ingest.listing import KeyTally


FILE_ROW_SCHEMA = catalog.FILE_SCHEMA.append(pa.field("unchanged", pa.bool_()))
ROW_SCHEMAS = {"files": FILE_ROW_SCHEMA, "volumes": catalog.VOLUME_SCHEMA}
ROW_KEYS = {"files": ("source", "path"), "volumes": ("volume_id",)}
# Rows and bytes per row group of a part at most: what a merge reads of a part at once.
PART_GROUP = 1024
PART_BYTES = 256 << 10


def write_rows(rows: list[dict] | pa.Table, name: str, out_path: str | os.PathLike) -> str:
    """A run's ``files`` or ``volumes`` rows as a Parquet part sorted by key (atomically);
    returns its path. Conversion tasks hand their rows over this way: a task's return value
    stays in the memory of its Dask worker and of the flow until the run ends, a path is
    small; sorted parts are merged into the catalog as a stream (:func:`catalog.merge_sorted`)."""
    schema, key = ROW_SCHEMAS[name], ROW_KEYS[name]
    table = catalog.conform(rows, schema) if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    table = table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in key]))
    out_path = str(out_path)
    with location.replacing(Path(out_path)) as tmp:
        pq.write_table(table, tmp, row_group_size=PART_GROUP)
    return out_path


class RunRows:
    """A run's catalog rows, ``files`` (one per input) and ``volumes``, kept on disk as
    Parquet parts each sorted by key, never in memory: at 10^6 files the rows alone are
    ~200 MB of Arrow. What the run reports is counted as parts arrive: the keys' tally (for
    :func:`check_accounting`), files per status, the most frequent reasons, unchanged files,
    volumes and voxels.

    Parts are compacted as in a log-structured merge tree: :data:`FANIN` parts of one level
    are merged (:func:`catalog.merge_sorted`) into one part of the next, so a merge never
    reads more than a few dozen parts at once, and each row is rewritten a few times at most.

    ``rows.add("files", rows)`` writes rows (dicts or a table) as a part; ``add_part`` takes a
    part a task wrote with :func:`write_rows`.
    """

    FANIN = 8
    # distinct (status, reason) pairs counted exactly; beyond it the rarest are dropped
    # (failure reasons name their file, so an archive of broken files has one per file)
    REASONS = 4096

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._parts: dict[str, list[tuple[int, str]]] = {"files": [], "volumes": []}
        self._made = 0
        self.tally = KeyTally()
        self.status = {s: 0 for s in catalog.STATUSES}
        self.reasons: dict[tuple[str, str | None], int] = {}
        self.files = self.volumes = self.voxels = self.unchanged = 0

    def add(self, name: str, rows: list[dict] | pa.Table) -> None:
        if len(rows):
            self._take(name, write_rows(rows, name, self._new_path(name)))

    def add_part(self, name: str, path: str) -> None:
        """A sorted part written by :func:`write_rows` (it becomes the run's: compaction deletes it)."""
        self._take(name, path)

    def parts(self, name: str) -> list[str]:
        """The parts, at most :data:`FANIN` of them (the lowest levels merged into one first):
        what the catalog merge reads at once stays the same whatever the archive's size."""
        parts = self._parts[name]
        if len(parts) > self.FANIN:
            parts.sort(key=lambda part: part[0])
            self._merge(name, [path for _, path in parts[:len(parts) - self.FANIN + 1]], parts[-1][0] + 1)
        return [path for _, path in parts]

    def tables(self, name: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The rows of every part, a row group at a time."""
        for path in self.parts(name):
            pf = pq.ParquetFile(path)
            for g in range(pf.metadata.num_row_groups):
                yield pf.read_row_group(g, columns=columns)

    def summary(self) -> dict[str, Any]:
        top = sorted(self.reasons.items(), key=lambda item: (-item[1], item[0][0], item[0][1] or ""))[:10]
        return {"files": self.files, **self.status, "volumes": self.volumes, "unchanged": self.unchanged,
                "voxels": self.voxels,
                "top_reasons": [{"files": n, "status": status, "reason": reason} for (status, reason), n in top]}

    def _new_path(self, name: str) -> str:
        self._made += 1
        return str(self.folder / f"{name}-{self._made:06d}.parquet")

    def _take(self, name: str, path: str) -> None:
        pf = pq.ParquetFile(path)
        for g in range(pf.metadata.num_row_groups):
            (self._count_files if name == "files" else self._count_volumes)(pf.read_row_group(g))
        self._parts[name].append((0, path))
        self._compact(name)

    def _count_files(self, table: pa.Table) -> None:
        self.tally.add_table(table)
        self.files += table.num_rows
        for item in pc.value_counts(table["status"]).to_pylist():
            if item["values"] not in self.status:
                raise ValueError(f"file rows with unknown status {item['values']!r}; "
                                 f"expected one of {catalog.STATUSES}")
            self.status[item["values"]] += item["counts"]
        if "unchanged" in table.column_names:
            self.unchanged += int(pc.sum(pc.fill_null(table["unchanged"], False)).as_py() or 0)
        settled = table.filter(pc.not_equal(table["status"], "converted"))
        for r in settled.group_by(["status", "reason"]).aggregate([("path", "count")]).to_pylist():
            k = (r["status"], r["reason"])
            self.reasons[k] = self.reasons.get(k, 0) + r["path_count"]
        if len(self.reasons) > 2 * self.REASONS:
            self.reasons = dict(sorted(self.reasons.items(), key=lambda item: -item[1])[:self.REASONS])

    def _count_volumes(self, table: pa.Table) -> None:
        self.volumes += table.num_rows
        self.voxels += sum(int(np.prod(shape)) for shape in table["shape"].to_pylist())

    def _compact(self, name: str) -> None:
        while True:
            levels = defaultdict(list)
            for level, path in self._parts[name]:
                levels[level].append(path)
            full = [level for level, paths in levels.items() if len(paths) >= self.FANIN]
            if not full:
                return
            level = min(full)
            self._merge(name, levels[level], level + 1)

    def _merge(self, name: str, merging: list[str], level: int) -> None:
        """Merge parts into one part of ``level`` (and delete them)."""
        out = self._new_path(name)
        location.write_parquet_stream(
            (t.drop_columns(["_rank"]) for t in catalog.merge_sorted(merging, ROW_SCHEMAS[name], ROW_KEYS[name])),
            ROW_SCHEMAS[name], out, row_group=PART_GROUP, group_bytes=PART_BYTES)
        for path in merging:
            os.remove(path)
        self._parts[name][:] = [p for p in self._parts[name] if p[1] not in merging] + [(level, out)]
        release_arrow_memory()


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps for reuse back to the system. pyarrow's
    default pool (mimalloc) keeps freed pages of every Parquet read and write; over a
    10^5-file run that was ~35 MB of resident memory that grew with the archive."""
    pa.default_memory_pool().release_unused()
