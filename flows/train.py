"""The train flow: one training run on a Dask worker, on a GPU worker when there is one."""

from __future__ import annotations

import contextlib

import dask
from prefect import flow, get_run_logger

from flows.runner import run_on_dask
from models.run import TrainRun
from tasks.train import train


@flow(name="train", description="Train a model on the preprocessed store; register it; promote if better")
def train_flow(run: TrainRun, gpu: bool = False) -> dict:
    """``gpu``: run the training task only on a Dask worker started with ``--resources GPU=1``."""
    annotate = dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext()
    with annotate:
        future = train.submit(run)
    summary = future.result()
    get_run_logger().info("model %s/%s on %s: validation %s, promoted %s", summary["name"], summary["version"],
                          summary["device"], {k: summary["validation"].get(k) for k in ("monitor",)},
                          summary["promoted"])
    return summary


def run_train(run: TrainRun, gpu: bool | None = None, **kwargs) -> dict:
    """Run on Dask; ``gpu=None`` asks for a GPU worker when this machine has a GPU (the local
    cluster then declares one)."""
    from flows.runtime import use_gpu

    return run_on_dask(train_flow, run, gpu=use_gpu(gpu), **kwargs)
