"""The augment flow: N replayable augmented copies of each preprocessed volume, on Dask."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.progress import RunProgress
from flows.runner import run_on_dask
from tasks.augment import augment_volumes
from voxelflow import augment


@flow(name="augment", description="Offline augmentation with stored, replayable parameters")
def augment_flow(config: augment.OfflineConfig, pairs_per_task: int = 4) -> dict:
    log = get_run_logger()
    todo, existing = augment.plan(config)
    log.info("%d copies to make, %d already made", len(todo), existing)
    futures = [augment_volumes.submit(config, todo[i:i + pairs_per_task])
               for i in range(0, len(todo), pairs_per_task)]
    progress = RunProgress(len(todo), f"augmenting: {len(todo)} copies")
    rows = []
    for fut in futures:
        rows += fut.result()
        progress.advance(pairs_per_task)
    progress.close()
    augment.write_catalog(config, rows)
    summary = {"output": str(augment.output_root(config)), "made": len(rows), "existing": existing}
    create_table_artifact(key="augment-summary",
                          table=[{"augmented_id": r["augmented_id"], "params": r["params"]} for r in rows[:50]],
                          description=f"{len(rows)} augmented copies in {summary['output']} (first 50 shown)")
    return summary


def run_augment(config: augment.OfflineConfig, **kwargs) -> dict:
    """Run the flow on Dask (see :func:`flows.runner.run_on_dask` for ``kwargs``)."""
    return run_on_dask(augment_flow, config, **kwargs)
