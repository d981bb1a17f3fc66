"""The ingest flow: sources -> batched header scan -> series plans -> volumes -> catalog."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from flows.progress import RunProgress
from flows.runner import run_on_dask
from tasks.qc import gallery
from tasks.ingest import convert_series, scan_headers
from voxelflow import catalog, ingest
from voxelflow.io.sources import iter_inputs


def _failed_rows(records: list[dict], reason: str) -> list[dict]:
    """Rows for files whose task failed for good (after retries): accounted, with why."""
    return [{"source": r["source"], "path": r["path"], "status": "failed", "reason": reason,
             "volume_id": None, "digest": r.get("digest")} for r in records]


@flow(name="ingest", description="DICOM/NIfTI sources into an OME-Zarr store with a catalog")
def ingest_flow(config: ingest.IngestConfig, qc: bool = True) -> dict:
    """Ingest ``config.sources`` into ``config.store``; returns the run summary. ``qc``: bring
    the store's QC gallery up to date (``STORE/qc/index.html``)."""
    log = get_run_logger()
    ingest.prepare_store(config.store, config.secret_file)
    scratch = Path(config.scratch) if config.scratch else Path(ingest.default_scratch())
    own_scratch = config.scratch is None
    try:
        # The inputs go to a listing file as they are found (unpacking archives on the way):
        # this process keeps its path, length and tally, never a list of 10^6 entries.
        listing = ingest.Listing.write(iter_inputs(config.sources, scratch / "unpacked"),
                                       scratch / "listing.parquet")
        log.info("%d input files from %d sources", listing.files, len(config.sources))
        progress = RunProgress(listing.files, f"scanning headers of {listing.files} files")

        # 1. Headers, in batches on the Dask workers, each reading its rows of the listing.
        # Batches and jobs travel as JSON text: Prefect walks list and dict parameters element
        # by element looking for futures, seconds per 10^4 files (README, "Why the defaults").
        futures = {scan_headers.submit(ingest.dump_batch(listing, start, stop), config.store, config.secret_file,
                                       str(scratch / "scan" / f"{i:06d}.parquet")): (start, stop)
                   for i, (start, stop) in enumerate(listing.batches(config.batch_size))}
        scan_tables: list[str] = []
        # The run's catalog rows go to sorted parts on disk as they come (ingest.RunRows)
        rows = ingest.RunRows(scratch / "run")
        for fut in as_completed(list(futures)):
            start, stop = futures[fut]
            result = fut.result(raise_on_failure=False)
            if isinstance(result, BaseException):  # after retries: account for the files
                rows.add("files", _failed_rows([asdict(e) for e in listing.read(start, stop)],
                                               f"header scan failed: {type(result).__name__}: {result}"))
            else:
                scan_tables.append(result)
            progress.advance(stop - start)
        progress.close()

        # 2. Plan: group by series; files settled by the scan get their rows now.
        task_batches = ingest.plan_jobs(sorted(scan_tables), config.files_per_task, rows,
                                        ingest.Previous(config.store))
        to_convert = sum(j["n"] for jobs in task_batches for j in jobs)
        progress = RunProgress(to_convert, f"converting {to_convert} files, "
                                           f"{sum(len(jobs) for jobs in task_batches)} series")

        # 3. Convert, a batch of series per task.
        conv = {convert_series.submit(json.dumps(jobs), config.store, config.secret_file, config.chunk,
                                      config.keep_localizers, str(scratch / "rows" / f"{i:06d}.parquet"),
                                      config.resample_tilt): jobs
                for i, jobs in enumerate(task_batches)}
        for fut in as_completed(list(conv)):
            jobs = conv[fut]
            n = sum(j["n"] for j in jobs)
            result = fut.result(raise_on_failure=False)
            if isinstance(result, BaseException):
                recs = [r for j in jobs for r in ingest.job_records(j, ["source", "path", "digest"])]
                rows.add("files", _failed_rows(recs, f"conversion failed: {type(result).__name__}: {result}"))
            else:
                for path in result["volumes_tables"]:
                    rows.add_part("volumes", path)
                for path in result["files_tables"]:
                    rows.add_part("files", path)
            progress.advance(n)
        progress.close()

        ingest.check_accounting(listing, rows)
        gone = catalog.update_catalog(config.store, rows.parts("volumes"), rows.parts("files"), config.sources)
        summary = rows.summary() | {"gone": gone}
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    summary |= {"store": str(config.store), "flow_run_id": str(flow_run.id),
                "ui_url": url_for("flow-run", obj_id=flow_run.id)}
    create_table_artifact(
        key="ingest-summary",
        table=[{"metric": k, "value": summary[k]} for k in
               ("files", "converted", "skipped", "failed", "volumes", "voxels", "unchanged", "gone")],
        description=f"Ingest into {config.store}")
    if summary["top_reasons"]:
        create_table_artifact(
            key="ingest-not-converted",
            table=summary["top_reasons"],
            description="Most frequent reasons files were skipped or failed (full list: catalog/files.parquet)")
    create_markdown_artifact(
        key="ingest-catalog",
        markdown=(f"### Ingest\n\nStore `{config.store}`: **{summary['volumes']} volumes** from "
                  f"{summary['converted']} files; {summary['skipped']} skipped, "
                  f"{summary['failed']} failed.\n\nCatalog: `catalog/volumes.parquet`, "
                  f"`catalog/files.parquet`."))
    log.info("ingest done: %d files, %d converted, %d skipped, %d failed, %d volumes",
             summary["files"], summary["converted"], summary["skipped"], summary["failed"],
             summary["volumes"])
    if qc:
        summary["qc_report"] = gallery(config.store)
    return summary


def run_ingest(config: ingest.IngestConfig, **kwargs) -> dict:
    """Run the flow on Dask; ``kwargs``: ``dask_address``, ``n_workers``, ``api_url``
    (see :func:`flows.runner.run_on_dask`)."""
    return run_on_dask(ingest_flow, config, **kwargs)
