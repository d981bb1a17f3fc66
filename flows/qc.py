"""The qc flow: the store's QC gallery brought up to date, its drawing spread over Dask."""

from __future__ import annotations

from prefect import flow

from flows.runner import run_on_dask
from tasks.qc import gallery


@flow(name="qc", description="The store's QC gallery (STORE/qc/index.html): planes, outlines, reasons")
def qc_flow(store: str) -> str | None:
    """The report's path, or None when it could not be written (a warning says why)."""
    return gallery(store)


def run_qc(store: str, **kwargs) -> str | None:
    """Run the flow on Dask (see :func:`flows.runner.run_on_dask` for ``kwargs``)."""
    return run_on_dask(qc_flow, store, **kwargs)
