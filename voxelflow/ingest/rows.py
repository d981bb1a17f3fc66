"""The run's catalog rows on disk (``sorted_parquet.SortedParts``: sorted Parquet parts,
compacted in levels), counted as they arrive: statuses, reasons, volumes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from voxelflow import catalog
from voxelflow.ingest.listing import KeyTally
from voxelflow.sorted_parquet import SortedParts, write_part

FILE_ROW_SCHEMA = catalog.FILE_SCHEMA.append(pa.field("unchanged", pa.bool_()))
ROW_SCHEMAS = {"files": FILE_ROW_SCHEMA, "volumes": catalog.VOLUME_SCHEMA}
ROW_KEYS = {"files": ("source", "path"), "volumes": ("volume_id",)}


def write_rows(rows: list[dict] | pa.Table, name: str, out_path: str | os.PathLike) -> str:
    """A run's ``files`` or ``volumes`` rows as a Parquet part sorted by key (atomically);
    returns its path. Conversion tasks hand their rows over this way: a task's return value
    stays in the memory of its Dask worker and of the flow until the run ends, a path is
    small; sorted parts are merged into the catalog as a stream (``sorted_parquet.merge_sorted``)."""
    return write_part(rows, ROW_SCHEMAS[name], ROW_KEYS[name], out_path)


class RunRows:
    """A run's catalog rows, ``files`` (one per input) and ``volumes``, kept on disk as
    sorted parts (:class:`~voxelflow.sorted_parquet.SortedParts`), never in memory: at 10^6
    files the rows alone are ~200 MB of Arrow. What the run reports is counted as parts
    arrive: the keys' tally (for :func:`check_accounting`), files per status, the most
    frequent reasons, unchanged files, volumes and voxels.

    ``rows.add("files", rows)`` writes rows (dicts or a table) as a part; ``add_part`` takes a
    part a task wrote with :func:`write_rows`.
    """

    FANIN = SortedParts.FANIN
    # distinct (status, reason) pairs counted exactly; beyond it the rarest are dropped
    # (failure reasons name their file, so an archive of broken files has one per file)
    REASONS = 4096

    def __init__(self, folder: str | os.PathLike):
        counters = {"files": self._count_files, "volumes": self._count_volumes}
        self._tables = {name: SortedParts(folder, name, ROW_SCHEMAS[name], ROW_KEYS[name], on_part=counters[name],
                                          fanin=self.FANIN) for name in ROW_SCHEMAS}
        self.tally = KeyTally()
        self.status = {s: 0 for s in catalog.STATUSES}
        self.reasons: dict[tuple[str, str | None], int] = {}
        self.files = self.volumes = self.voxels = self.unchanged = 0

    def add(self, name: str, rows: list[dict] | pa.Table) -> None:
        self._tables[name].add(rows)

    def add_part(self, name: str, path: str) -> None:
        """A sorted part written by :func:`write_rows` (it becomes the run's: compaction deletes it)."""
        self._tables[name].add_part(path)

    def parts(self, name: str) -> list[str]:
        """The parts, at most :data:`FANIN` of them: what the catalog merge reads at once stays
        the same whatever the archive's size."""
        return self._tables[name].paths()

    def levels(self, name: str) -> list[int]:
        """The compaction level of each part of ``name``."""
        return self._tables[name].levels()

    def tables(self, name: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The rows of every part, a row group at a time."""
        return self._tables[name].tables(columns)

    def summary(self) -> dict[str, Any]:
        top = sorted(self.reasons.items(), key=lambda item: (-item[1], item[0][0], item[0][1] or ""))[:10]
        return {"files": self.files, **self.status, "volumes": self.volumes, "unchanged": self.unchanged,
                "voxels": self.voxels,
                "top_reasons": [{"files": n, "status": status, "reason": reason} for (status, reason), n in top]}

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
