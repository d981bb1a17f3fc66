"""The train flow: one training run on a Dask worker (a GPU worker when there is one), or a
data-parallel run with one rank on each of ``world_size`` workers."""

from __future__ import annotations

import contextlib
import time

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runner import run_on_dask
from flows.terminal import named_metrics
from models.distributed import RankLostError, Ranks, free_port
from models.run import TrainRun
from models.plan import needs_plan
from tasks.train import plan, publish, train, train_rank
from voxelflow.errors import SettingError

# how long the flow waits for enough workers to join (a cluster still starting)
WORKERS_WAIT_S = 60.0
# how long a rank's failure waits for the scheduler to notice another rank's worker is gone
LOST_WORKER_WAIT_S = 10.0


@flow(name="train", description="Train a model on the preprocessed store; register it; promote if better")
def train_flow(run: TrainRun, gpu: bool = False) -> dict:
    """``gpu``: run the training only on Dask workers started with ``--resources GPU=1``.
    Settings the run leaves open (patch, batch, depth of a planned task) are planned first, on a
    worker of the kind that trains."""
    if needs_plan(run.train):
        with _on_training_workers(gpu):
            run = plan.submit(run).result()
    if run.folds and run.fold is None:
        summary = _cross_validate(run, gpu)
    elif run.world_size > 1:
        summary = _data_parallel(run, gpu)
    else:
        with _on_training_workers(gpu):
            future = train.submit(run)
        summary = future.result()
    if run.plan:
        summary = summary | {"plan": run.plan}
    get_run_logger().info("model %s/%s on %s: validation %s; promoted %s, %s samples/s", summary["name"],
                          summary["version"], summary["device"], named_metrics(summary["validation"]),
                          summary["promoted"], summary["throughput"]["samples_per_s"])
    return summary


def _on_training_workers(gpu: bool):
    """Tasks submitted inside go to GPU workers when ``gpu``, to any worker otherwise."""
    return dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext()


def _cross_validate(run: TrainRun, gpu: bool) -> dict:
    """The folds in parallel, one training task each on any worker (a GPU worker with
    ``gpu``); data-parallel folds one after another, each on all its ranks (two folds' ranks
    pinned to the same workers could each wait for the other's). Then the group is recorded
    and its table published."""
    from prefect.context import FlowRunContext

    from models import crossval

    folds = run.fold_runs()
    if run.world_size > 1:
        summaries = [_data_parallel(f, gpu) for f in folds]
    else:
        workers = FlowRunContext.get().task_runner.client.scheduler_info(n_workers=-1)["workers"].values()
        per_host: dict[str, int] = {}
        for w in workers:
            per_host[w["host"]] = per_host.get(w["host"], 0) + 1
        share = min(len(folds), max(per_host.values(), default=1))  # folds training at once on one machine
        with _on_training_workers(gpu):
            futures = [train.with_options(task_run_name=f"train-fold-{f.fold}").submit(f, share) for f in folds]
        summaries = [f.result() for f in futures]
    summary = crossval.record(run, summaries)
    create_table_artifact(key=f"train-{summary['name']}-folds".lower().replace("_", "-"), table=[
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in summary["table"]],
        description=f"{summary['name']} {summary['group']}: {run.folds}-fold cross-validation, "
                    f"mean and sd over the folds")
    return summary


def rank_workers(client, world: int, gpu: bool, wait_s: float = WORKERS_WAIT_S) -> list[tuple[str, str]]:
    """``(address, host)`` of the ``world`` workers that take the ranks, in a stable order (by
    name): workers with a ``GPU`` resource when ``gpu``. Waits up to ``wait_s`` for them."""
    deadline = time.monotonic() + wait_s
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        fit = sorted(((a, w) for a, w in workers.items() if not gpu or w.get("resources", {}).get("GPU", 0) >= 1),
                     key=lambda aw: str(aw[1].get("name")))
        if len(fit) >= world:
            return [(a, w["host"]) for a, w in fit[:world]]
        if time.monotonic() > deadline:
            kind = "Dask workers with a GPU resource" if gpu else "Dask workers"
            raise SettingError(f"world_size {world} needs {world} {kind}; the cluster at "
                               f"{client.scheduler.address} has {len(fit)} after {wait_s:.0f} s")
        time.sleep(1.0)


def _data_parallel(run: TrainRun, gpu: bool) -> dict:
    """One ``train-rank`` task pinned to each chosen worker, rendezvous at rank 0's host; a
    worker that leaves the cluster (its process killed, its machine gone) fails the run at once,
    naming it; a rank that fails fails the run with its reason."""
    from prefect.context import FlowRunContext

    client = FlowRunContext.get().task_runner.client
    workers = rank_workers(client, run.world_size, gpu)
    head = workers[0][0]
    port = client.run(free_port, workers=[head])[head]
    init = f"tcp://{workers[0][1]}:{port}"
    log = get_run_logger()
    log.info("data-parallel training on %d workers (%s), rendezvous %s", run.world_size,
             ", ".join(a for a, _ in workers), init)
    futures = []
    for rank, (address, host) in enumerate(workers):
        on_host = [a for a, h in workers if h == host]
        pin = {"workers": [address], "allow_other_workers": False} | ({"resources": {"GPU": 1}} if gpu else {})
        with dask.annotate(**pin):
            futures.append(train_rank.submit(run, Ranks(rank, run.world_size, init, run.rank_timeout_s),
                                             on_host.index(address), len(on_host)))
    results = _await_ranks(client, futures, [a for a, _ in workers])
    summary = results[0]
    table = [{"rank": r, "worker": a, "device": res["device"],
              "samples_per_s": summary["throughput"]["rank_samples_per_s"][r]}
             for r, ((a, _), res) in enumerate(zip(workers, results))]
    publish(summary, table)
    return summary | {"ranks": table}


def _await_ranks(client, futures: list, addresses: list[str], poll_s: float = 1.0) -> list[dict]:
    """The ranks' results once all are done; raises as soon as one fails or its worker leaves."""
    pending = dict(enumerate(futures))
    results: dict[int, dict] = {}

    def lost() -> RankLostError | None:
        alive = set(client.scheduler_info(n_workers=-1)["workers"])
        gone = [r for r in pending if addresses[r] not in alive]
        if not gone:
            return None
        for future in pending.values():
            future.wrapped_future.cancel()
        return RankLostError(f"rank {gone[0]} of {len(futures)}: its Dask worker {addresses[gone[0]]} left the "
                             "cluster during training (process killed or machine lost); the run is not registered "
                             "and resumes from its last checkpoint when started again")

    while pending:
        for rank, future in list(pending.items()):
            if future.wrapped_future.done():
                try:
                    results[rank] = future.result()
                except Exception:
                    # a peer's death reaches the others as a broken connection, often before the
                    # scheduler has seen the worker go: give it a moment, then name the lost one
                    del pending[rank]
                    for _ in range(int(LOST_WORKER_WAIT_S / poll_s)):
                        if (error := lost()) is not None:
                            raise error from None
                        time.sleep(poll_s)
                    raise  # this rank's own failure
                del pending[rank]
        if not pending:
            break
        if (error := lost()) is not None:
            raise error
        time.sleep(poll_s)
    return [results[r] for r in range(len(futures))]


def run_train(run: TrainRun, gpu: bool | None = None, **kwargs) -> dict:
    """Run on Dask; ``gpu=None`` asks for a GPU worker when this machine has a GPU (the local
    cluster then declares one). A local cluster has at least one worker per rank."""
    from flows.runtime import use_gpu

    if run.world_size > 1 and not kwargs.get("dask_address"):
        kwargs["n_workers"] = max(kwargs.get("n_workers") or 0, run.world_size)
    return run_on_dask(train_flow, run, gpu=use_gpu(gpu), **kwargs)
