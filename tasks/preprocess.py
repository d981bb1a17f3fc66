"""Preprocessing task: a batch of volumes per task; returns catalog rows only."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.retry import RETRY
from voxelflow import preprocess


@task(name="preprocess-volumes", cache_policy=NO_CACHE, **RETRY)
def preprocess_volumes(config: preprocess.PreprocessConfig, items: list[dict]) -> list[dict]:
    rows = [preprocess.preprocess_volume(config, i["volume"], i["label_digest"]) for i in items]
    get_run_logger().info("preprocessed %d volumes (%d failed)", len(rows),
                          sum(r["status"] == "failed" for r in rows))
    return rows
