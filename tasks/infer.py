"""Inference task: a batch of volumes per task, the model loaded once per task (GPU if any)."""

from __future__ import annotations

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.retry import RETRY
from models import infer


@task(name="infer-volumes", cache_policy=NO_CACHE, **RETRY)
def infer_volumes(config: infer.InferConfig, info: dict, volume_ids: list[str]) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, lesions = infer.infer_volumes(infer.load_predictor(config, info, device), volume_ids)
    get_run_logger().info("predicted %d volumes on %s (%d lesions)", len(rows), device, len(lesions))
    return {"rows": rows, "lesions": lesions}
