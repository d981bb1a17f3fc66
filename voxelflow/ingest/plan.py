"""Planning: scan records grouped into conversion jobs (a series, or a NIfTI file each),
compared with the catalog of the last run so unchanged inputs are not converted again."""

from __future__ import annotations

from collections import defaultdict
from typing import Literal, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from voxelflow import catalog
from voxelflow.ingest.config import MAX_TASKS
from voxelflow.ingest.rows import FILE_ROW_SCHEMA, RunRows
from voxelflow.sorted_parquet import conform, release_arrow_memory


class ConversionJob(TypedDict):
    """One unit of conversion: a DICOM series or a NIfTI file. It travels to a task as JSON
    (Prefect would otherwise walk a large Python structure looking for futures) and names its
    records instead of holding them: ``refs`` lists, per scan table, the runs of rows
    (``[start, stop)``) holding its files; :func:`job_records` reads them."""

    kind: Literal["dicom", "nifti"]
    series: str | None  # the series' pseudonym (None for a NIfTI file)
    refs: list[list]  # [[scan table path, [[start, stop], ...]], ...]
    n: int  # files


class Previous:
    """What earlier runs recorded for a store, as Arrow tables (the catalog, never a Python
    object per file): each file's row with its content digest and the series of the DICOM
    volume it went into, so an incremental run converts only series and NIfTI files that are
    new or changed.

    Attributes:
        files: the ``files`` catalog plus ``series_id`` (of the file's DICOM volume, or null).
        volume_ids: the volumes the catalog holds.
        series_files: per series, how many files went into its volumes.
    """

    def __init__(self, store: str):
        files = conform(catalog.read_table(store, "files"), catalog.FILE_SCHEMA)
        volumes = conform(catalog.read_table(store, "volumes"), catalog.VOLUME_SCHEMA)
        volumes = volumes.select(["volume_id", "series_id", "kind"])
        dicom = volumes.filter(pc.equal(volumes["kind"], "dicom")).select(["volume_id", "series_id"])
        self.files = files.join(dicom, keys="volume_id", join_type="left outer")
        self.volume_ids = volumes["volume_id"].combine_chunks()
        counts = self.files.filter(pc.is_valid(self.files["series_id"])).group_by("series_id") \
            .aggregate([("path", "count")])
        self.series_files = dict(zip(counts["series_id"].to_pylist(), counts["path_count"].to_pylist()))

    def __len__(self) -> int:
        return self.files.num_rows

    def compare(self, table: pa.Table) -> pa.Table:
        """``table`` (``source``, ``path``, ``digest``, ...) with each file's earlier row
        (``old_status``, ``old_reason``, ``old_volume_id``, ``old_digest``, ``old_series``;
        null for a new file) and ``same``: its content is unchanged and what it made exists.
        Rows come back in no particular order."""
        prev = self.files.rename_columns(["source", "path", "old_status", "old_reason", "old_volume_id",
                                          "old_digest", "old_series"])
        joined = table.join(prev, keys=["source", "path"], join_type="left outer")
        exists = pc.or_kleene(pc.is_null(joined["old_volume_id"]),
                              pc.is_in(joined["old_volume_id"], value_set=self.volume_ids))
        same = pc.and_(pc.fill_null(pc.equal(joined["old_digest"], joined["digest"]), False), exists)
        return joined.append_column("same", same)


# What planning reads of the scan tables; the full records stay on disk until a conversion
# task reads its own (so the flow's memory does not grow with the records' width, and task
# parameters stay small: Prefect walks every parameter of every task it submits).
PLAN_COLUMNS = ["source", "path", "kind", "status", "reason", "series", "digest"]


def _runs(rows) -> list[list[int]]:
    """Row numbers as sorted ``[start, stop)`` runs: a series' files mostly sit together in its
    scan table (the listing walks folders in order), so a job's references stay a few numbers
    however many files it has."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def _rows(runs: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs]) if runs else np.empty(0, np.int64)


def read_rows(path: str, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
    """Rows ``rows`` (sorted, unique) of a Parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
    group_of = np.searchsorted(bounds, rows, side="right") - 1
    groups = np.unique(group_of)
    table = pf.read_row_groups([int(g) for g in groups], columns=columns)
    sizes = bounds[groups + 1] - bounds[groups]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each group starts in ``table``
    return table.take(rows - bounds[group_of] + offsets[np.searchsorted(groups, group_of)])


def read_job_tables(jobs: list[dict], columns: list[str] | None = None) -> dict[str, tuple[np.ndarray, pa.Table]]:
    """The rows a batch of jobs refers to, each scan table read once (only the row groups
    holding them): ``{scan_table: (rows, table of those rows)}``, for :func:`job_records`."""
    wanted: dict[str, list[np.ndarray]] = defaultdict(list)
    for job in jobs:
        for path, runs in job["refs"]:
            wanted[path].append(_rows(runs))
    out = {}
    for path, parts in wanted.items():
        rows = np.unique(np.concatenate(parts))
        out[path] = (rows, read_rows(path, rows, columns))
    release_arrow_memory()
    return out


def job_records(job: dict, columns: list[str] | None = None,
                tables: dict[str, tuple[np.ndarray, pa.Table]] | None = None) -> list[dict]:
    """The scan records of a conversion job, read from the scan tables it refers to
    (``tables``: what :func:`read_job_tables` read for its batch)."""
    if tables is None:
        tables = read_job_tables([job], columns)
    records: list[dict] = []
    for path, runs in job["refs"]:
        rows, table = tables[path]
        records += table.take(np.searchsorted(rows, _rows(runs))).to_pylist()
    return records


def plan_jobs(scan_tables: list[str], files_per_task: int, rows: RunRows,
              previous: Previous | None = None) -> list[list[ConversionJob]]:
    """Group scanned records into conversion jobs and settle the rest: the ``files`` rows of
    files already settled by the scan, or unchanged since an earlier run (``previous``; marked
    ``unchanged``, their volumes left as they are), go to ``rows``.

    Returns:
        Lists of jobs packed so a task handles about ``files_per_task`` files (a large series
        is a task of its own), of :class:`ConversionJob`.
    """
    # per series, its files in each scan table: (table, row numbers)
    series: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    jobs: list[ConversionJob] = []
    incremental = previous is not None and len(previous) > 0
    still_open: list[pa.Table] = []  # incremental runs compare these with the catalog at once
    for k, path in enumerate(scan_tables):
        table = pq.read_table(path, columns=PLAN_COLUMNS)
        table = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        done = pc.fill_null(pc.not_equal(table["status"], ""), False)
        rows.add("files", table.filter(done))
        table = table.filter(pc.invert(done))
        if incremental:
            still_open.append(table.select(["source", "path", "kind", "series", "digest", "_row"])
                              .append_column("_table", pa.array(np.full(table.num_rows, k, dtype=np.int32))))
            continue
        dicom = pc.equal(table["kind"], "dicom")
        jobs += [_nifti_job(path, row) for row in table.filter(pc.invert(dicom))["_row"].to_pylist()]
        for group in table.filter(dicom).group_by("series").aggregate([("_row", "list")]).to_pylist():
            series[group["series"]].append((path, np.asarray(group["_row_list"], dtype=np.int64)))
        del table
    if still_open:
        unchanged, changed = _compare_with_previous(pa.concat_tables(still_open), previous)
        del still_open
        rows.add("files", unchanged)
        dicom = pc.equal(changed["kind"], "dicom")
        jobs += [_nifti_job(scan_tables[r["_table"]], r["_row"])
                 for r in changed.filter(pc.invert(dicom)).select(["_table", "_row"]).to_pylist()]
        for group in changed.filter(dicom).group_by(["series", "_table"]).aggregate([("_row", "list")]).to_pylist():
            series[group["series"]].append((scan_tables[group["_table"]], np.asarray(group["_row_list"])))
        del changed
    for uid in sorted(series):
        refs = [[t, _runs(found)] for t, found in sorted(series.pop(uid), key=lambda item: item[0])]
        jobs.append(ConversionJob(kind="dicom", series=uid, refs=refs, n=sum(b - a for _, runs in refs for a, b in runs)))
    # Jobs in scan order (a task's jobs then share few scan tables), packed; the largest
    # batches go first so a big series does not start last.
    jobs.sort(key=lambda j: (j["refs"][0][0], j["refs"][0][1][0][0]))
    # Aim for at least ~8 tasks when there is enough work, so small archives still spread
    # over the workers, and at most ~MAX_TASKS; a series is never split.
    total = sum(j["n"] for j in jobs)
    files_per_task = max(1, min(files_per_task, -(-total // 8)), -(-total // MAX_TASKS))
    batches: list[list[ConversionJob]] = []
    current: list[ConversionJob] = []
    count = 0
    for job in jobs:
        n = job["n"]
        if current and count + n > files_per_task:
            batches.append(current)
            current, count = [], 0
        current.append(job)
        count += n
    if current:
        batches.append(current)
    batches.sort(key=lambda b: -sum(j["n"] for j in b))
    release_arrow_memory()
    return batches


def _nifti_job(scan_table: str, row: int) -> ConversionJob:
    return ConversionJob(kind="nifti", series=None, refs=[[scan_table, _runs([row])]], n=1)


def _compare_with_previous(still_open: pa.Table, previous: Previous) -> tuple[pa.Table, pa.Table]:
    """Split the files the scan left open into those unchanged since the earlier runs (their
    earlier ``files`` rows, marked ``unchanged``) and those to convert.

    A NIfTI file is unchanged when its content is the same and it was converted. A DICOM
    series is unchanged when none of its files changed, none was added, and none of the files
    that went into its volumes is gone (the files of this run whose earlier rows went into
    this series' volumes are as many as went in then)."""
    rows = previous.compare(still_open)
    dicom = pc.equal(rows["kind"], "dicom")
    nifti_same = pc.and_(pc.invert(dicom), pc.and_(rows["same"], pc.fill_null(
        pc.equal(rows["old_status"], "converted"), False)))
    in_series = pc.fill_null(pc.equal(rows["old_series"], rows["series"]), False)
    stats = rows.filter(dicom).append_column("_same", pc.cast(rows.filter(dicom)["same"], pa.int64())) \
        .append_column("_in", pc.cast(in_series.filter(dicom), pa.int64())) \
        .group_by("series").aggregate([("_row", "count"), ("_same", "sum"), ("_in", "sum")])
    kept = [uid for uid, n, n_same, n_in in zip(*(stats[c].to_pylist() for c in
                                                  ("series", "_row_count", "_same_sum", "_in_sum")))
            if n_same == n and n_in == previous.series_files.get(uid, 0) > 0]
    series_same = pc.and_(dicom, pc.is_in(rows["series"], value_set=pa.array(kept, pa.string())))
    unchanged = pc.or_(nifti_same, series_same)
    old = rows.filter(unchanged)
    old_rows = pa.table({"source": old["source"], "path": old["path"], "status": old["old_status"],
                         "reason": old["old_reason"], "volume_id": old["old_volume_id"],
                         "digest": old["old_digest"], "unchanged": pa.array(np.ones(old.num_rows, bool))},
                        schema=FILE_ROW_SCHEMA)
    return old_rows, rows.filter(pc.invert(unchanged)).select(["kind", "series", "_table", "_row"])


