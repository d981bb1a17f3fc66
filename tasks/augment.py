"""Augmentation task: a batch of (volume, copy) pairs per task; returns catalog rows."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.retry import RETRY
from voxelflow import augment


@task(name="augment-volumes", cache_policy=NO_CACHE, **RETRY)
def augment_volumes(config: augment.OfflineConfig, pairs: list[tuple[str, int]]) -> list[dict]:
    rows = [augment.augment_volume(config, vid, copy) for vid, copy in pairs]
    get_run_logger().info("made %d augmented copies on %s", len(rows), augment.device())
    return rows
