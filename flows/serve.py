"""``voxelflow serve``: the deployments of ``deployment/prefect.yaml`` run on this machine by one
Prefect runner, until a stop signal (Ctrl-C / SIGTERM)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

from voxelflow import location
from voxelflow.errors import ConfigurationError


def served_config_file(config, config_path: str | os.PathLike, overridden: bool) -> Path:
    """The nightly configuration file the served deployments read at each run: the user's, or,
    when ``config`` was overridden on the command line, ``config`` written under
    ``$VOXELFLOW_HOME/serve/`` (a deployment's parameter is a file, as for work pools)."""
    if not overridden:
        return Path(config_path).resolve()
    from voxelflow.deid import voxelflow_home

    text = config.model_dump_json(indent=2)
    out = voxelflow_home() / "serve" / f"nightly-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    location.makedirs(out.parent)
    location.write_bytes(out, text.encode())
    return out


def check_names_free(deps: list, api_url: str) -> None:
    """Refuse to serve a name ``prefect deploy`` already gave to a work-pool deployment. Prefect's
    runner would update that deployment in place and keep its pool and code location (none, for
    a pull-step deployment), so its runs would crash loading the flow, and a worker of the pool
    could pick them up too."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for dep in deps:
            name = f"{dep.flow_name}/{dep.name}"
            try:
                found = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if found.work_pool_name:
                taken.append(f"{name} (work pool {found.work_pool_name})")
    if taken:
        raise ConfigurationError(
            f"the Prefect server at {api_url} already has work-pool deployments of these names, made by "
            f"`prefect deploy`: {', '.join(taken)}; run them with workers of those pools, or delete them "
            "(`prefect deployment delete FLOW/NAME`) before serving here")


def serve(deps: list, api, limit: int | None, keep_server: bool, stop_after_s: float = 60) -> None:
    """Serve ``deps`` until a stop signal; then stop a local server this command started
    (unless ``keep_server``)."""
    from prefect import serve as prefect_serve

    from flows import runtime

    def interrupted(*_):
        _stop_watchdog(deps, api, stop_after_s, keep_server)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        check_names_free(deps, api.api_url)
        prefect_serve(*deps, print_starting_message=False, limit=limit)
    except KeyboardInterrupt:
        pass
    finally:
        if api.started_here and not keep_server:
            runtime.stop_local_server()


def _stop_watchdog(deps: list, api, seconds: float, keep_server: bool) -> None:
    """After a stop signal, give Prefect's runner ``seconds`` to shut down. It pauses the
    schedules, then waits for its flow-run subprocesses to close their output; a run that left
    a process holding that pipe (seen once in a while with a run's Dask workers on a loaded
    machine) would keep it waiting forever. Then: pause the schedules here and exit."""

    def watch() -> None:
        time.sleep(seconds)
        print(f"the runner did not stop within {seconds:.0f} s (a run's subprocess still holds it); "
              "pausing the deployments' schedules and exiting", flush=True)
        try:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                for dep in deps:
                    found = client.read_deployment_by_name(f"{dep.flow_name}/{dep.name}")
                    client.pause_deployment(found.id)
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the pause failed
            print(f"could not pause the schedules: {type(exc).__name__}: {exc}", flush=True)
        if api.started_here and not keep_server:
            from flows import runtime

            runtime.stop_local_server()
        print("stopped", flush=True)
        os._exit(0)

    if not any(t.name == "voxelflow-stop-watchdog" for t in threading.enumerate()):
        threading.Thread(target=watch, name="voxelflow-stop-watchdog", daemon=True).start()
