"""Training tasks: one model on one Dask worker (a GPU worker when asked), or one rank of a
data-parallel run; per-epoch progress, and the metrics table, curve and sample images as
Prefect artifacts (rank 0's, for a data-parallel run)."""

from __future__ import annotations

import json
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

from models.distributed import Ranks
from models.plan import explicit_settings, plan_run
from models.run import TrainRun, train_model
from voxelflow import location
from tasks.artifacts import png_markdown
from tasks.retry import RETRY


def _threads(share: int) -> None:
    """Dask workers run one thread each (right for many conversions at once); a training run
    takes this machine's cores, split between the ``share`` ranks it runs here
    (VOXELFLOW_TRAIN_THREADS caps it)."""
    if torch.cuda.is_available():
        return
    threads = int(os.environ.get("VOXELFLOW_TRAIN_THREADS", 0)) or max(1, len(os.sched_getaffinity(0)) // share)
    torch.set_num_threads(threads)
    get_run_logger().info("training on CPU with %d threads", threads)


def _progress(run: TrainRun):
    """The run's progress artifact and the per-epoch callback that updates it and logs."""
    log = get_run_logger()
    fold = f" fold {run.fold} of {run.folds}" if run.fold is not None else ""
    progress = create_progress_artifact(progress=0.0, description=f"training {run.name or run.train.task}{fold}")

    def on_epoch(row: dict) -> None:
        update_progress_artifact(progress, 100.0 * row["epoch"] / run.train.optimisation.epochs)
        log.info("epoch %d: loss %.4f, validation monitor %.4f, %.1f samples/s, data wait %.0f%%", row["epoch"],
                 row["train_loss"], row["monitor"], row["samples_per_s"], 100 * row["data_wait_share"])

    return progress, on_epoch


def publish(summary: dict, ranks: list[dict] | None = None) -> None:
    """The finished run's artifacts: metrics per epoch, test metrics, curve, samples and, for a
    data-parallel run, each rank's worker, device and throughput."""
    key = f"train-{summary['name']}".lower().replace("_", "-")
    folder = location.path(summary["folder"])
    history = json.loads((folder / "model.json").read_text())["metrics"]["history"]
    create_table_artifact(key=f"{key}-epochs", table=[{k: (round(v, 4) if isinstance(v, float) else v)
                                                        for k, v in r.items()} for r in history],
                          description=f"{summary['name']} {summary['version']}: metrics per epoch")
    test = {k: v for k, v in summary["test"].items() if not isinstance(v, list)}
    create_table_artifact(key=f"{key}-test", table=[{"metric": k, "value": v} for k, v in test.items()],
                          description=f"{summary['name']} {summary['version']}: test split "
                                      f"(promoted: {summary['promoted']})")
    if ranks:
        t = summary["throughput"]
        create_table_artifact(key=f"{key}-ranks", table=ranks,
                              description=f"{summary['name']} {summary['version']}: {t['world_size']} ranks, "
                                          f"{t['samples_per_s']} samples/s in all")
    create_markdown_artifact(key=f"{key}-curve", markdown=png_markdown(folder / "curve.png", "Training curve"))
    if (folder / "samples.png").exists():
        create_markdown_artifact(key=f"{key}-samples", markdown=png_markdown(folder / "samples.png", "Samples"))


@task(name="plan-training", cache_policy=NO_CACHE, **RETRY)
def plan(run: TrainRun) -> TrainRun:
    """The run with the settings it left open planned from its data, on a worker of the kind
    that trains (its device's memory sizes the patch and the batch); the plan as a table."""
    planned, p = plan_run(run)
    name = run.name or run.train.task
    get_run_logger().info("plan %s for %s on %s: patch %s, batch %d, channels %s (estimated %.0f MiB of %.0f)",
                          p.plan_id(), name, p.device, p.patch_size, p.batch_size, p.channels,
                          p.estimated_bytes / 2 ** 20, p.memory_bytes / 2 ** 20)
    create_table_artifact(key=f"train-{name}-plan".lower().replace("_", "-"),
                          table=[{k: v if isinstance(v, (int, float, str)) else json.dumps(v) for k, v in r.items()}
                                 for r in p.table()],
                          description=f"{name}: plan {p.plan_id()} from fingerprint {p.fingerprint}; "
                                      f"given by the run, kept: {sorted(explicit_settings(run.train)) or 'none'}")
    return planned


@task(name="train-model", cache_policy=NO_CACHE, **RETRY)
def train(run: TrainRun, share: int = 1) -> dict:
    """``share``: training runs at once on this machine (cross-validation folds), which split
    its cores."""
    progress, on_epoch = _progress(run)
    _threads(share)
    summary = train_model(run, on_epoch=on_epoch)
    update_progress_artifact(progress, 100.0)
    publish(summary)
    return summary


# no retries: a rank run again alone cannot rejoin the others (the flow runs the ranks again)
@task(name="train-rank", cache_policy=NO_CACHE, task_run_name="train-rank-{ranks.rank}")
def train_rank(run: TrainRun, ranks: Ranks, local_rank: int, local_ranks: int) -> dict:
    """Rank ``ranks.rank`` of a data-parallel run, the ``local_rank``-th of ``local_ranks`` ranks on
    this machine (its GPU: that index among the GPUs this worker sees)."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    _threads(local_ranks)
    progress, on_epoch = _progress(run) if ranks.main else (None, None)
    summary = train_model(run, on_epoch=on_epoch, device=device, ranks=ranks)
    if progress is not None:
        update_progress_artifact(progress, 100.0)
    return summary | {"worker_pid": os.getpid()}
