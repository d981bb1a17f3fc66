"""The whole ingest in one process (:func:`run_local`) and its accounting check."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from voxelflow import catalog
from voxelflow.ingest.config import IngestConfig, prepare_store, store_key
from voxelflow.ingest.convert import convert_jobs
from voxelflow.ingest.listing import KeyTally, Listing
from voxelflow.ingest.plan import Previous, plan_jobs
from voxelflow.ingest.rows import RunRows
from voxelflow.ingest.scan import scan_batch
from voxelflow.io.sources import InputFile, iter_inputs


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
