"""Ingest tasks. Each takes and returns paths and small row dicts, never volumes."""

from __future__ import annotations

import os

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.retry import RETRY
from voxelflow import ingest
from voxelflow.io.sources import InputFile


@task(name="scan-headers", cache_policy=NO_CACHE, **RETRY)
def scan_headers(entries: list[InputFile], store: str, secret_file: str | None, out_path: str) -> str:
    """Read the headers of a batch of files; write their de-identified records to Parquet."""
    key = ingest.store_key(store, secret_file)
    path = ingest.scan_batch(entries, key, out_path)
    get_run_logger().info("scanned %d files on worker pid %d -> %s", len(entries), os.getpid(), path)
    return path


@task(name="convert-series", cache_policy=NO_CACHE, **RETRY)
def convert_series(jobs: list[dict], store: str, secret_file: str | None, chunk: int,
                   keep_localizers: bool = False) -> dict:
    """Build and write the volumes of a batch of series / NIfTI files; return catalog rows."""
    key = ingest.store_key(store, secret_file)
    rows = ingest.convert_jobs(store, key, jobs, chunk, keep_localizers)
    failed = sum(r["status"] == "failed" for r in rows["files"])
    get_run_logger().info("%d jobs on worker pid %d: %d volumes written, %d files failed",
                          len(jobs), os.getpid(), len(rows["volumes"]), failed)
    return rows
