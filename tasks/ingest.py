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
    the run's listing, read a row group at a time); write their de-identified records to Parquet."""
    key = ingest.store_key(store, secret_file)
    path = ingest.scan_batch(ingest.load_batch(batch), key, out_path)
    get_run_logger().info("scanned %s on worker pid %d -> %s", batch, os.getpid(), path)
    return path


@task(name="convert-series", cache_policy=NO_CACHE, **RETRY)
def convert_series(jobs: str, store: str, secret_file: str | None, chunk: int, keep_localizers: bool,
                   rows_path: str, resample_tilt: bool = False) -> dict:
    """Build and write the volumes of a batch of series / NIfTI files (``jobs``: JSON text of
    :func:`voxelflow.ingest.plan_jobs` jobs), a chunk of files at a time. Returns the paths of
    the Parquet parts (beside ``rows_path``, one pair per chunk, each sorted by key) holding
    the catalog rows of the volumes written (``"volumes_tables"``) and of the files
    (``"files_tables"``): as a return value, the rows would stay in the memory of the worker
    and of the flow until the run ends, and the task's memory would grow with its batch."""
    jobs = json.loads(jobs)
    key = ingest.store_key(store, secret_file)
    base = rows_path.removesuffix(".parquet")
    out: dict[str, list[str]] = {"volumes_tables": [], "files_tables": []}
    volumes = failed = 0
    for i, rows in enumerate(ingest.convert_jobs(store, key, jobs, chunk, keep_localizers, resample_tilt)):
        out["volumes_tables"].append(ingest.write_rows(rows["volumes"], "volumes", f"{base}.{i:04d}.volumes.parquet"))
        out["files_tables"].append(ingest.write_rows(rows["files"], "files", f"{base}.{i:04d}.files.parquet"))
        volumes += len(rows["volumes"])
        failed += sum(r["status"] == "failed" for r in rows["files"])
    get_run_logger().info("%d jobs on worker pid %d: %d volumes written, %d files failed",
                          len(jobs), os.getpid(), volumes, failed)
    return out
