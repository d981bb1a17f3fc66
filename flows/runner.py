"""Run a flow on Dask against a given Prefect API."""

from __future__ import annotations

from typing import Any

from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.runtime import task_runner


def run_on_dask(flow_obj, *args: Any, dask_address: str | None = None, n_workers: int | None = None,
                api_url: str | None = None, in_process: bool = False, **kwargs: Any) -> Any:
    """Call ``flow_obj`` with a DaskTaskRunner (an existing scheduler or a LocalCluster), or,
    with ``in_process`` and no scheduler named, on this process's threads; reporting to
    ``api_url`` when given (the workers get it through the environment)."""
    run = flow_obj.with_options(task_runner=task_runner(dask_address, n_workers, in_process))
    updates: dict = {PREFECT_API_URL: api_url} if api_url else {}
    if in_process:
        # A run of a few seconds needs no heartbeat (they let a server find a crashed run of
        # hours), and its thread costs half a second on average at the end of every run: the
        # flow joins it while it sleeps in 1-s steps (README, "Small runs").
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    with temporary_settings(updates=updates):
        return run(*args, **kwargs)
