"""Ingest, the library side: scan headers in batches, plan volumes, convert them.

Everything here is plain Python on values and paths, so it runs on a Dask worker, in a test
or in a notebook; ``tasks/ingest.py`` and ``flows/ingest.py`` only wrap and wire it.

The accounting rule: every input file ends in exactly one ``files`` row — ``converted`` (with
its volume), ``skipped`` (not an image, with why) or ``failed`` (with why).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator

from voxelflow import catalog, location
from voxelflow.deid import create_key, key_path, load_key, pseudonym
from voxelflow.errors import InvalidInputError, NotAnImageError
from voxelflow.geometry import orientation_code
from voxelflow.io.dicom import HEAD_BYTES, looks_like_dicom, not_part_of_a_volume, plan_series, scan_dicom, stack_volume
from voxelflow.io.dicom.record import SCHEMA as DICOM_RECORD_SCHEMA
from voxelflow.io.nifti import looks_like_nifti, read_nifti
from voxelflow.io.sources import InputFile, is_archive, iter_inputs
from voxelflow.store import clean_staging, init_store, store_id, write_volume


# Tasks per stage at most: each Prefect task costs ~0.1-0.3 s of API calls and scheduling,
# so a 10^6-file archive in 256-file batches would spend longer orchestrating than working.
MAX_TASKS = 64


class IngestConfig(BaseModel):
    """What to ingest and where. Passed as the ingest flow's (validated) parameter."""

    model_config = ConfigDict(frozen=True)

    sources: list[str] = Field(min_length=1, description="folders, archives or files (a source named twice "
                                                         "is read once)")
    store: str = Field(description="store root (created if missing)")
    scratch: str | None = Field(None, description="folder for unpacked archives and scan tables")
    secret_file: str | None = Field(None, description="de-identification key file")
    batch_size: int | None = Field(None, ge=1, description="files per header-scan task (default: up to 1024, "
                                                           f"8 tasks or more; never more than {MAX_TASKS} tasks)")
    files_per_task: int = Field(1024, ge=1, description="pack small series into tasks up to this many files "
                                                        f"(likewise 8 to about {MAX_TASKS} conversion tasks)")
    chunk: int = Field(64, ge=8, description="chunk edge length in voxels")
    keep_localizers: bool = Field(False, description="store localizer / scout images (as 2-D images) "
                                                     "instead of skipping them")
    resample_tilt: bool = Field(False, description="resample gantry-tilted (sheared) stacks onto an orthogonal "
                                                   "grid, as dcm2niix's _Tilt output, instead of keeping their "
                                                   "exact sheared geometry; the catalog records which was done")

    @field_validator("sources")
    @classmethod
    def _once_each(cls, sources: list[str]) -> list[str]:
        # the same source twice would list each of its files twice, under the same key
        return list(dict.fromkeys(sources))


# ----------------------------------------------------------------------------- store + key


def prepare_store(store: str, secret_file: str | None = None) -> str:
    """Create or open the store and make sure its key exists. Returns the store id.

    Clears what killed runs left in ``.staging/`` (never visible; written again by this run).

    Raises:
        StoreError: the store cannot be created.
        ConfigurationError: an existing store's key cannot be found.
    """
    sid = init_store(store)
    clean_staging(store)
    if secret_file:
        load_key(sid, secret_file)
    elif not key_path(sid).exists():
        if (location.path(store) / "catalog" / "files.parquet").exists():
            load_key(sid)  # raises: a used store without its key would get new pseudonyms
        create_key(sid)
    return sid


def store_key(store: str, secret_file: str | None = None) -> bytes:
    return load_key(store_id(store), secret_file)


# ----------------------------------------------------------------------------- scanning

SCAN_SCHEMA = pa.schema([
    ("source", pa.string()), ("path", pa.string()), ("local", pa.string()),
    ("kind", pa.string()),  # dicom | nifti | none
    ("status", pa.string()), ("reason", pa.string()),  # set when the file is settled at scan
    *DICOM_RECORD_SCHEMA,  # a DICOM file's header record (voxelflow.io.dicom.record.ScanRecord)
    ("digest", pa.string()),  # the file's content (incremental runs compare it)
])


def classify_file(entry: InputFile, key: bytes) -> dict[str, Any]:
    """Scan one input file: a DICOM header record, a NIfTI candidate, or a settled row."""
    rec: dict[str, Any] = {"source": entry.source, "path": entry.path, "local": entry.local}
    if entry.reason:
        return rec | {"kind": "none", "status": "failed", "reason": entry.reason}
    try:
        with open(entry.local, "rb", buffering=0) as fh:
            head = fh.read(HEAD_BYTES)  # the header parse reads from these bytes
            rec["digest"] = file_digest(fh, head, complete=len(head) == os.fstat(fh.fileno()).st_size)
    except OSError as exc:
        return rec | {"kind": "none", "status": "failed", "reason": f"cannot read file: {exc.strerror or exc}"}
    if not head:
        return rec | {"kind": "none", "status": "skipped", "reason": "empty file (0 bytes)"}
    if looks_like_nifti(head, entry.path):
        return rec | {"kind": "nifti"}
    if looks_like_dicom(head):
        try:
            return rec | {"kind": "dicom"} | scan_dicom(entry.local, entry.path, key, head=head)
        except NotAnImageError as exc:
            return rec | {"kind": "none", "status": "skipped", "reason": exc.reason}
        except InvalidInputError as exc:
            return rec | {"kind": "none", "status": "failed", "reason": exc.reason}
        except OSError:
            raise  # transient (the task retries); a file's own corruption is caught above
        except Exception as exc:  # noqa: BLE001 - a parser crash on this file must not fail its batch
            return rec | {"kind": "none", "status": "failed",
                          "reason": f"DICOM header cannot be read ({type(exc).__name__}: {exc})"}
    if is_archive(entry.path):
        return rec | {"kind": "none", "status": "skipped",
                      "reason": "archive inside a source, not unpacked (archive limits: depth 0)"}
    name = entry.path.lower()
    if name.endswith((".dcm", ".ima", ".nii", ".nii.gz", ".dcm.gz")):
        return rec | {"kind": "none", "status": "failed",
                      "reason": "named like DICOM/NIfTI but its content is neither (corrupt or mislabelled)"}
    return rec | {"kind": "none", "status": "skipped", "reason": "not a DICOM or NIfTI file"}


def file_digest(fh, head: bytes = b"", complete: bool = False) -> str:
    """Content digest of an open file (``head``: the bytes already read from it): what an
    incremental run compares, not timestamps. XXH3-128 (~10 GB/s; BLAKE2b ran at ~1 GB/s and
    cost 10 % of a CT ingest). It detects changes; it is not meant to resist forgery."""
    h = xxhash.xxh3_128(head)
    while not complete and (block := fh.read(1 << 20)):  # complete: ``head`` is the whole file
        h.update(block)
    return "xxh3:" + h.hexdigest()


def scan_batch(entries: Iterable[InputFile], key: bytes, out_path: str) -> str:
    """Scan files and write their records to a Parquet file, a row group at a time, taking
    ``entries`` as they come (:func:`iter_listing`): a task's memory stays the same whatever
    its batch size. Returns the file's path."""
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out_path}.partial"
    entries = iter(entries)
    with pq.ParquetWriter(tmp, SCAN_SCHEMA) as writer:
        while True:
            records = [classify_file(e, key) for e in itertools.islice(entries, SCAN_GROUP)]
            writer.write_table(pa.Table.from_pylist(records, schema=SCAN_SCHEMA))
            if len(records) < SCAN_GROUP:
                break
    os.replace(tmp, out_path)
    release_arrow_memory()
    return out_path


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps for reuse back to the system. pyarrow's
    default pool (mimalloc) keeps freed pages of every Parquet read and write; over a
    10^5-file run that was ~35 MB of resident memory that grew with the archive."""
    pa.default_memory_pool().release_unused()


# ----------------------------------------------------------------------------- the listing

LISTING_SCHEMA = pa.schema([("source", pa.string()), ("path", pa.string()), ("local", pa.string()),
                            ("reason", pa.string())])
# Rows per row group of the listing (3 short strings a row) and of scan tables (a DICOM
# header record, ~2 kB): the unit a task reads or writes at once.
LISTING_GROUP = 4096
SCAN_GROUP = 1024
_MASK128 = (1 << 128) - 1


class KeyTally:
    """An order-independent fingerprint of a multiset of ``(source, path)`` keys: their count
    and the sum of their XXH3-128 hashes modulo 2^128. Equal multisets give equal tallies; a
    missing, extra or duplicated key changes the sum unless 128-bit hashes collide. It lets
    accounting check 10^6 inputs against their rows without holding either set in memory."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count, self.total = 0, 0

    def add(self, sources: list[str], paths: list[str]) -> None:
        h = xxhash.xxh3_128_intdigest
        self.total = (self.total + sum(h(f"{s}\0{p}".encode("utf-8", "surrogatepass"))
                                       for s, p in zip(sources, paths))) & _MASK128
        self.count += len(paths)

    def add_table(self, table: pa.Table) -> KeyTally:
        """Add the keys of a table with ``source`` and ``path`` columns, a slice at a time."""
        for batch in table.select(["source", "path"]).to_batches(max_chunksize=65536):
            self.add(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyTally) and (self.count, self.total) == (other.count, other.total)

    def __repr__(self) -> str:
        return f"KeyTally({self.count} keys, {self.total:032x})"


class Listing:
    """The run's input files, as found, in a Parquet file in the scratch folder (row groups
    of :data:`LISTING_GROUP`): the flow and the library keep only its path, its length and the
    keys' tally, so their memory does not grow with the archive. Scan tasks read their slice.

    Attributes:
        path: the Parquet file.
        files: how many inputs it lists.
        tally: :class:`KeyTally` of its keys (what accounting checks the run's rows against).
    """

    def __init__(self, path: str, files: int, tally: KeyTally):
        self.path, self.files, self.tally = path, files, tally

    @classmethod
    def write(cls, entries: Iterable[InputFile], out_path: str | os.PathLike) -> Listing:
        """Write ``entries`` (an iterator: :func:`voxelflow.io.sources.iter_inputs`) as they come."""
        out_path = str(out_path)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{out_path}.partial"
        tally, group = KeyTally(), []

        def flush(writer: pq.ParquetWriter) -> None:
            columns = list(zip(*((e.source, e.path, e.local, e.reason) for e in group))) or [[]] * 4
            tally.add(columns[0], columns[1])
            writer.write_table(pa.table([pa.array(c, pa.string()) for c in columns], schema=LISTING_SCHEMA))
            group.clear()

        with pq.ParquetWriter(tmp, LISTING_SCHEMA) as writer:
            for entry in entries:
                group.append(entry)
                if len(group) == LISTING_GROUP:
                    flush(writer)
            if group or not tally.count:
                flush(writer)
        os.replace(tmp, out_path)
        return cls(out_path, tally.count, tally)

    def read(self, start: int = 0, stop: int | None = None) -> list[InputFile]:
        """Entries ``start`` to ``stop`` (reading only the row groups that hold them)."""
        return read_listing(self.path, start, self.files if stop is None else stop)

    def keys(self) -> pa.Table:
        """All ``(source, path)`` keys (to name what accounting found missing or unexpected)."""
        return pq.read_table(self.path, columns=["source", "path"])

    def batches(self, batch_size: int | None = None) -> list[tuple[int, int]]:
        """Scan batches as ``(start, stop)`` rows: ``batch_size`` files (default: up to 1024,
        in at least 8 batches so small archives spread over the workers); larger when that
        gives more than :data:`MAX_TASKS`."""
        n = self.files
        size = batch_size or max(1, min(1024, -(-n // 8)))
        size = max(size, -(-n // MAX_TASKS))
        return [(i, min(i + size, n)) for i in range(0, n, size)]


def read_listing(path: str, start: int, stop: int) -> list[InputFile]:
    """Entries ``start`` to ``stop`` of a listing file, reading only the row groups that hold them."""
    return list(iter_listing(path, start, stop))


def iter_listing(path: str, start: int, stop: int) -> Iterator[InputFile]:
    """:func:`read_listing` a row group at a time."""
    pf = pq.ParquetFile(path)
    offset = 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if offset + rows > start and offset < stop:
            table = pf.read_row_group(g)
            table = table.slice(max(start - offset, 0), min(stop, offset + rows) - max(start, offset))
            yield from (InputFile(*values) for values in zip(*(table[c].to_pylist() for c in LISTING_SCHEMA.names)))
        offset += rows
        if offset >= stop:
            break


def dump_batch(listing: Listing, start: int, stop: int) -> str:
    """A scan batch as compact JSON text (a task parameter Prefect does not walk): the listing
    file and the rows to scan, never the entries themselves."""
    return json.dumps([listing.path, start, stop])


def load_batch(text: str) -> Iterator[InputFile]:
    """The entries of a :func:`dump_batch` text, read a row group at a time."""
    path, start, stop = json.loads(text)
    return iter_listing(path, start, stop)


# ----------------------------------------------------------------------------- planning


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
        files = catalog.conform(catalog.read_table(store, "files"), catalog.FILE_SCHEMA)
        volumes = catalog.conform(catalog.read_table(store, "volumes"), catalog.VOLUME_SCHEMA)
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
              previous: Previous | None = None) -> list[list[dict]]:
    """Group scanned records into conversion jobs and settle the rest: the ``files`` rows of
    files already settled by the scan, or unchanged since an earlier run (``previous``; marked
    ``unchanged``, their volumes left as they are), go to ``rows``.

    Returns:
        Lists of jobs packed so a task handles about ``files_per_task`` files (a large series
        is a task of its own). A job is ``{"kind": "dicom" | "nifti", "series": ..., "refs":
        [[scan_table, [[start, stop], ...]], ...], "n": files}``; :func:`job_records` reads
        its records.
    """
    # per series, its files in each scan table: (table, row numbers)
    series: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    jobs: list[dict] = []
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
        jobs.append({"kind": "dicom", "series": uid, "refs": refs, "n": sum(b - a for _, runs in refs for a, b in runs)})
    # Jobs in scan order (a task's jobs then share few scan tables), packed; the largest
    # batches go first so a big series does not start last.
    jobs.sort(key=lambda j: (j["refs"][0][0], j["refs"][0][1][0][0]))
    # Aim for at least ~8 tasks when there is enough work, so small archives still spread
    # over the workers, and at most ~MAX_TASKS; a series is never split.
    total = sum(j["n"] for j in jobs)
    files_per_task = max(1, min(files_per_task, -(-total // 8)), -(-total // MAX_TASKS))
    batches: list[list[dict]] = []
    current: list[dict] = []
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


def _nifti_job(scan_table: str, row: int) -> dict:
    return {"kind": "nifti", "series": None, "refs": [[scan_table, _runs([row])]], "n": 1}


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


# ----------------------------------------------------------------------------- converting


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _file_row(rec: dict, status: str, reason: str | None = None, volume_id: str | None = None) -> dict:
    return {"source": rec["source"], "path": rec["path"], "status": status,
            "reason": reason, "volume_id": volume_id, "digest": rec.get("digest")}


def _volume_row(volume_id: str, info, affine: np.ndarray, *, kind: str, first: dict, stack: str,
                files: list[dict], attributes: str, warnings: list[str]) -> dict:
    return {
        "volume_id": volume_id,
        "patient_id": first.get("patient"), "study_id": first.get("study"),
        "series_id": first.get("series"), "stack": stack, "kind": kind,
        "modality": first.get("modality"), "shape": list(info.shape),
        "spacing": list(info.spacing), "orientation": orientation_code(affine),
        "dtype": info.dtype, "levels": info.levels,
        "affine": [float(v) for v in np.asarray(affine).ravel()],
        "n_files": len(files), "source_files": [f["path"] for f in files],
        "digest": info.digest, "attributes": attributes, "warnings": warnings,
        "ingested_at": _now(),
    }


def convert_dicom_series(store: str, key: bytes, series: str, records: list[dict],
                         chunk: int = 64, keep_localizers: bool = False,
                         resample_tilt: bool = False) -> tuple[list[dict], list[dict]]:
    """Plan and write the volumes of one DICOM series. Returns ``(volume_rows, file_rows)``.

    Bad input never raises: each file gets its row (``failed`` with the reason).
    """
    file_rows: list[dict] = []
    volume_rows: list[dict] = []
    # The same SOP instance twice (copies, several encodings of one image): keep the first.
    seen: dict[str, str] = {}
    unique: list[dict] = []
    for rec in sorted(records, key=lambda r: (r["source"], r["path"])):
        inst = rec["instance"]
        if inst and inst in seen:
            file_rows.append(_file_row(rec, "skipped", f"duplicate of {seen[inst]} (same SOPInstanceUID)"))
            continue
        if inst:
            seen[inst] = rec["path"]
        reason = not_part_of_a_volume(rec, keep_localizers)
        if reason:
            file_rows.append(_file_row(rec, "skipped", reason))
            continue
        unique.append(rec)
    if not unique:
        return [], file_rows
    left_out: list[tuple[dict, InvalidInputError]] = []  # images not part of any stack while the others are
    try:
        plans = plan_series(series, unique, left_out)
    except NotAnImageError as exc:
        return [], file_rows + [_file_row(r, "skipped", str(exc)) for r in unique]
    except InvalidInputError as exc:
        return [], file_rows + [_file_row(r, "failed", str(exc)) for r in unique]
    for rec, error in left_out:
        file_rows.append(_file_row(rec, "skipped" if isinstance(error, NotAnImageError) else "failed", str(error)))
    for plan in plans:
        volume_id = pseudonym(key, "volume", f"{series}|{plan.label}").lower()
        try:
            data, affine, extra = stack_volume(plan, resample_tilt)
            info = write_volume(store, volume_id, data, affine, chunk=chunk, time_step=plan.time_step,
                                channels=plan.channels, attributes={
                "kind": "dicom", "modality": plan.files[0]["modality"],
                "warnings": plan.warnings, "stack": plan.label, **extra})
        except InvalidInputError as exc:
            reason = f"series {series}" + (f" [{plan.label}]" if plan.label else "") + f": {exc}"
            file_rows.extend(_file_row(r, "failed", reason) for r in _distinct_files(plan.files))
            continue
        files = _distinct_files(plan.files)  # a multi-frame file is one file, not one per frame
        volume_rows.append(_volume_row(
            volume_id, info, affine, kind="dicom", first=plan.files[0], stack=plan.label,
            files=files, attributes=json.dumps(json.loads(plan.files[0]["attributes"] or "{}") | extra, sort_keys=True),
            warnings=plan.warnings))
        file_rows.extend(_file_row(r, "converted", None, volume_id) for r in files)
    # a multi-frame file whose frames went into several volumes (echoes, stacks) is one row:
    # converted (into the first volume) if any of its volumes was written
    by_path: dict[tuple, dict] = {}
    for row in file_rows:
        k = (row["source"], row["path"])
        if k not in by_path or (by_path[k]["status"] != "converted" and row["status"] == "converted"):
            by_path[k] = row
    return volume_rows, list(by_path.values())


def _distinct_files(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        if (r["source"], r["path"]) not in seen:
            seen.add((r["source"], r["path"]))
            out.append(r)
    return out


def convert_nifti_file(store: str, key: bytes, rec: dict, chunk: int = 64) -> tuple[list[dict], list[dict]]:
    """Write one NIfTI file as a volume. Returns ``(volume_rows, file_rows)``."""
    try:
        vol = read_nifti(rec["local"], rec["path"])
    except InvalidInputError as exc:
        return [], [_file_row(rec, "failed", exc.reason)]
    source_name = Path(rec["source"].rstrip("/")).name
    volume_id = pseudonym(key, "volume", f"nifti|{source_name}|{rec['path']}").lower()
    data = np.transpose(vol.data, tuple(range(vol.data.ndim))[::-1])  # (x,y,z[,t]) -> ([t,]z,y,x)
    data = np.ascontiguousarray(data)
    info = write_volume(store, volume_id, data, vol.affine, time_step=vol.time_step, chunk=chunk,
                        attributes={"kind": "nifti", "modality": None, "warnings": vol.warnings,
                                    "stack": ""})
    first = {"patient": None, "study": None, "series": None, "modality": None}
    row = _volume_row(volume_id, info, vol.affine, kind="nifti", first=first, stack="",
                      files=[rec], attributes="{}", warnings=vol.warnings)
    return [row], [_file_row(rec, "converted", None, volume_id)]


# Files converted between two hand-overs of rows: what a conversion task holds at once,
# whatever the size of its batch (a larger series is converted whole).
CONVERT_CHUNK = 1024


def convert_jobs(store: str, key: bytes, jobs: list[dict], chunk: int = 64,
                 keep_localizers: bool = False, resample_tilt: bool = False) -> Iterator[dict[str, list[dict]]]:
    """Run a batch of jobs, :data:`CONVERT_CHUNK` files at a time: yields ``{"volumes": [...],
    "files": [...]}`` rows per chunk of jobs, reading only that chunk's scan records."""
    group: list[dict] = []
    count = 0
    for job in [*jobs, None]:
        if group and (job is None or count + job["n"] > CONVERT_CHUNK):
            yield _convert_group(store, key, group, chunk, keep_localizers, resample_tilt)
            group, count = [], 0
        if job is not None:
            group.append(job)
            count += job["n"]


def _convert_group(store: str, key: bytes, jobs: list[dict], chunk: int, keep_localizers: bool,
                   resample_tilt: bool) -> dict:
    volumes: list[dict] = []
    files: list[dict] = []
    tables = read_job_tables(jobs)  # only these jobs' rows
    for job in jobs:
        records = job_records(job, tables=tables)
        if job["kind"] == "dicom":
            v, f = convert_dicom_series(store, key, job["series"], records, chunk, keep_localizers, resample_tilt)
        else:
            v, f = convert_nifti_file(store, key, records[0], chunk)
        volumes.extend(v)
        files.extend(f)
    del tables
    release_arrow_memory()
    return {"volumes": volumes, "files": files}


# ----------------------------------------------------------------------------- run rows

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
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out_path}.partial"
    pq.write_table(table, tmp, row_group_size=PART_GROUP)
    os.replace(tmp, out_path)
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


# ----------------------------------------------------------------------------- the run


def default_scratch() -> str:
    return tempfile.mkdtemp(prefix="voxelflow-scratch-")


def check_accounting(inputs: Listing | list[InputFile], rows: RunRows) -> None:
    """Every input has exactly one row. A violation is a bug in voxelflow: fail loudly.

    The check compares :class:`KeyTally` fingerprints, so neither side is held as a set; only
    when they differ are the keys read to say which are missing, unexpected or duplicated."""
    if isinstance(inputs, Listing):
        want_tally, want_keys = inputs.tally, inputs.keys
    else:
        keys = pa.table({"source": pa.array([e.source for e in inputs], pa.string()),
                         "path": pa.array([e.path for e in inputs], pa.string())})
        want_tally, want_keys = KeyTally().add_table(keys), lambda: keys
    if rows.tally == want_tally:
        return
    want = want_keys()
    want_set = set(zip(want["source"].to_pylist(), want["path"].to_pylist()))
    got_list = [key for t in rows.tables("files", ["source", "path"])
                for key in zip(t["source"].to_pylist(), t["path"].to_pylist())]
    missing = sorted(want_set - set(got_list))[:5]
    extra = sorted(set(got_list) - want_set)[:5]
    dup = len(got_list) - len(set(got_list))
    raise RuntimeError(f"file accounting broken: missing {missing}, unexpected {extra}, "
                       f"{dup} duplicate rows")


def run_local(config: IngestConfig) -> dict[str, Any]:
    """The whole ingest in this process, without Prefect or Dask: the reference the flow is
    tested against, and handy in a notebook. Same store, catalog and accounting."""
    import shutil


    prepare_store(config.store, config.secret_file)
    key = store_key(config.store, config.secret_file)
    scratch = Path(config.scratch or default_scratch())
    try:
        listing = Listing.write(iter_inputs(config.sources, scratch / "unpacked"), scratch / "listing.parquet")
        tables = [scan_batch(listing.read(start, stop), key, str(scratch / "scan" / f"{i:06d}.parquet"))
                  for i, (start, stop) in enumerate(listing.batches(config.batch_size))]
        rows = RunRows(scratch / "run")
        task_batches = plan_jobs(tables, config.files_per_task, rows, Previous(config.store))
        for jobs in task_batches:
            for converted in convert_jobs(config.store, key, jobs, config.chunk, config.keep_localizers,
                                          config.resample_tilt):
                rows.add("volumes", converted["volumes"])
                rows.add("files", converted["files"])
        check_accounting(listing, rows)
        gone = catalog.update_catalog(config.store, rows.parts("volumes"), rows.parts("files"), config.sources)
    finally:
        if not config.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return rows.summary() | {"store": config.store, "gone": gone}
