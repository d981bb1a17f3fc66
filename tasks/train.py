"""Training task: one model on one Dask worker (a GPU worker when asked), with per-epoch
progress and the metrics table, curve and sample images as Prefect artifacts."""

from __future__ import annotations

import os

import torch
from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from models.run import TrainRun, train_model
from voxelflow import location
from tasks.artifacts import png_markdown
from tasks.retry import RETRY


@task(name="train-model", cache_policy=NO_CACHE, **RETRY)
def train(run: TrainRun) -> dict:
    log = get_run_logger()
    progress = create_progress_artifact(progress=0.0, description=f"training {run.name or run.train.task}")

    def on_epoch(row: dict) -> None:
        update_progress_artifact(progress, 100.0 * row["epoch"] / run.train.optimisation.epochs)
        log.info("epoch %d: loss %.4f, validation %.4f, %.1f samples/s, data wait %.0f%%", row["epoch"],
                 row["train_loss"], row["monitor"], row["samples_per_s"], 100 * row["data_wait_share"])

    if not torch.cuda.is_available():
        # Dask workers run one thread each (right for many conversions at once); a training run
        # is its flow's only task, so it takes the machine's cores (VOXELFLOW_TRAIN_THREADS caps it).
        threads = int(os.environ.get("VOXELFLOW_TRAIN_THREADS", 0)) or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        log.info("training on CPU with %d threads", threads)
    summary = train_model(run, on_epoch=on_epoch)
    update_progress_artifact(progress, 100.0)
    key = f"train-{summary['name']}".lower().replace("_", "-")
    history = __import__("json").loads((location.path(summary["folder"]) / "model.json").read_text())["metrics"]["history"]
    create_table_artifact(key=f"{key}-epochs", table=[{k: (round(v, 4) if isinstance(v, float) else v)
                                                        for k, v in r.items()} for r in history],
                          description=f"{summary['name']} {summary['version']}: metrics per epoch")
    test = {k: v for k, v in summary["test"].items() if not isinstance(v, list)}
    create_table_artifact(key=f"{key}-test", table=[{"metric": k, "value": v} for k, v in test.items()],
                          description=f"{summary['name']} {summary['version']}: test split "
                                      f"(promoted: {summary['promoted']})")
    folder = location.path(summary["folder"])
    create_markdown_artifact(key=f"{key}-curve", markdown=png_markdown(folder / "curve.png", "Training curve"))
    if (folder / "samples.png").exists():
        create_markdown_artifact(key=f"{key}-samples", markdown=png_markdown(folder / "samples.png", "Samples"))
    return summary
