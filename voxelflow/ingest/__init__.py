"""Ingest, the library side: list the inputs, scan headers in batches, plan volumes, convert
them, merge the run's rows into the catalog.

Everything here is plain Python on values and paths, so it runs on a Dask worker, in a test
or in a notebook; ``tasks/ingest.py`` and ``flows/ingest.py`` only wrap and wire it. One
module per step, in the order a run takes them:

* :mod:`.config` — :class:`IngestConfig`, the store and its key;
* :mod:`.listing` — every input file streamed into a Parquet listing, with a key tally;
* :mod:`.scan` — header records (:class:`~voxelflow.io.dicom.record.ScanRecord`) in Parquet;
* :mod:`.plan` — conversion jobs (:class:`~voxelflow.ingest.plan.ConversionJob`), compared
  with the last run's catalog;
* :mod:`.convert` — volumes and catalog rows, a chunk of files at a time;
* :mod:`.rows` — the run's rows on disk (sorted parts, compacted, counted);
* :mod:`.run` — :func:`run_local` (the whole ingest in one process) and the accounting check.

The accounting rule: every input file ends in exactly one ``files`` row — ``converted`` (with
its volume), ``skipped`` (not an image, with why) or ``failed`` (with why).
"""

from voxelflow.ingest.config import MAX_TASKS, IngestConfig, prepare_store, store_key
from voxelflow.ingest.convert import CONVERT_CHUNK, convert_dicom_series, convert_jobs, convert_nifti_file
from voxelflow.ingest.listing import KeyTally, Listing, dump_batch, iter_listing, load_batch, read_listing
from voxelflow.ingest.plan import ConversionJob, Previous, job_records, plan_jobs, read_job_tables, read_rows
from voxelflow.ingest.rows import FILE_ROW_SCHEMA, RunRows, write_rows
from voxelflow.sorted_parquet import release_arrow_memory
from voxelflow.ingest.run import check_accounting, default_scratch, run_local
from voxelflow.ingest.scan import SCAN_SCHEMA, classify_file, file_digest, scan_batch

__all__ = [
    "CONVERT_CHUNK", "FILE_ROW_SCHEMA", "MAX_TASKS", "SCAN_SCHEMA", "ConversionJob", "IngestConfig", "KeyTally",
    "Listing", "Previous", "RunRows", "check_accounting", "classify_file", "convert_dicom_series", "convert_jobs",
    "convert_nifti_file", "default_scratch", "dump_batch", "file_digest", "iter_listing", "job_records",
    "load_batch", "plan_jobs", "prepare_store", "read_job_tables", "read_listing", "read_rows",
    "release_arrow_memory", "run_local", "scan_batch", "store_key", "write_rows",
]
