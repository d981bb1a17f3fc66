"""Run a flow on Dask against a given Prefect API."""

from __future__ import annotations

from typing import Any

from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.runtime import dask_task_runner


def run_on_dask(flow_obj, *args: Any, dask_address: str | None = None, n_workers: int | None = None,
                api_url: str | None = None, **kwargs: Any) -> Any:
    """Call ``flow_obj`` with a DaskTaskRunner (an existing scheduler or a LocalCluster),
    reporting to ``api_url`` when given (the workers get it through the environment)."""
    run = flow_obj.with_options(task_runner=dask_task_runner(dask_address, n_workers))
    if api_url:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            return run(*args, **kwargs)
    return run(*args, **kwargs)
