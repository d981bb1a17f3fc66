"""The preprocess flow: catalog selection -> a versioned preprocessed copy, on Dask."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed

from flows.progress import RunProgress
from flows.runner import run_on_dask
from tasks.preprocess import preprocess_volumes
from voxelflow import preprocess


@flow(name="preprocess", description="Reorient, resample, crop and normalise into a versioned copy")
def preprocess_flow(config: preprocess.PreprocessConfig, volumes_per_task: int = 2) -> dict:
    log = get_run_logger()
    config = preprocess.resolve(config)
    todo, done = preprocess.plan(config)
    log.info("version %s (spacing %s): %d volumes to process, %d unchanged", config.version(),
             config.spacing, len(todo), len(done))
    batches = [todo[i:i + volumes_per_task] for i in range(0, len(todo), volumes_per_task)]
    futures = {preprocess_volumes.submit(config, b): b for b in batches}
    progress = RunProgress(len(todo), f"preprocessing {len(todo)} volumes")
    rows = []
    for fut in as_completed(list(futures)):
        progress.advance(len(futures[fut]))
        result = fut.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            rows += [{"volume_id": i["volume"]["volume_id"], "status": "failed",
                      "reason": f"task failed: {type(result).__name__}: {result}",
                      "source_digest": i["volume"]["digest"], "label_digest": i["label_digest"],
                      "modality": i["volume"]["modality"]} for i in futures[fut]]
        else:
            rows += result
    progress.close()
    preprocess.write_catalog(config, rows)
    summary = preprocess.summarize(config, rows, done)
    create_table_artifact(
        key="preprocess-summary",
        table=[{"metric": k, "value": str(summary[k])} for k in ("version", "spacing", "processed", "unchanged", "failed")],
        description=f"Preprocessed copy {summary['output']}")
    return summary


def run_preprocess(config: preprocess.PreprocessConfig, **kwargs) -> dict:
    """Run the flow on Dask; ``kwargs``: ``dask_address``, ``n_workers``, ``api_url``
    (see :func:`flows.runner.run_on_dask`)."""
    return run_on_dask(preprocess_flow, config, **kwargs)
