"""Ingest tasks. Each takes and returns paths and small row dicts, never volumes."""

from __future__ import annotations

import json
import os

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.retry import RETRY
from voxelflow import ingest


@task(name="scan-headers", cache_policy=NO_CACHE, **RETRY)
def scan_headers(batch: str, store: str, secret_file: str | None, out_path: str) -> str:
    """Read the headers of a batch of files (:func:`voxelflow.ingest.dump_batch` text: rows of
    the run's listing); write their de-identified records to Parquet."""
    entries = ingest.load_batch(batch)
    key = ingest.store_key(store, secret_file)
    path = ingest.scan_batch(entries, key, out_path)
    get_run_logger().info("scanned %d files on worker pid %d -> %s", len(entries), os.getpid(), path)
    return path


@task(name="convert-series", cache_policy=NO_CACHE, **RETRY)
def convert_series(jobs: str, store: str, secret_file: str | None, chunk: int, keep_localizers: bool,
                   rows_path: str) -> dict:
    """Build and write the volumes of a batch of series / NIfTI files (``jobs``: JSON text of
    :func:`voxelflow.ingest.plan_jobs` jobs). Returns the paths of two Parquet files holding
    the catalog rows (sorted by key) of the volumes written (``"volumes_table"``) and of the files
    (``"files_table"``), beside ``rows_path``: as a return value, the rows would stay in the
    memory of the worker and of the flow until the run ends."""
    jobs = json.loads(jobs)
    key = ingest.store_key(store, secret_file)
    rows = ingest.convert_jobs(store, key, jobs, chunk, keep_localizers)
    failed = sum(r["status"] == "failed" for r in rows["files"])
    get_run_logger().info("%d jobs on worker pid %d: %d volumes written, %d files failed",
                          len(jobs), os.getpid(), len(rows["volumes"]), failed)
    base = rows_path.removesuffix(".parquet")
    return {"volumes_table": ingest.write_rows(rows["volumes"], "volumes", f"{base}.volumes.parquet"),
            "files_table": ingest.write_rows(rows["files"], "files", rows_path)}
