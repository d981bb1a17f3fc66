"""Where runs go: the Prefect API and the Dask cluster.

``voxelflow`` works with no Prefect server configured: it starts one local server on
loopback (SQLite under ``$VOXELFLOW_HOME/prefect``) the first time, with the warm runner
beside it (:mod:`flows.warm`), and reuses them on later runs. Without this, Prefect would
start a temporary server in the CLI process *and in every Dask worker process* (see
shared/ENVIRONMENT.md), which costs tens of seconds per run. A configured ``PREFECT_API_URL``
(environment or Prefect profile) is used as it is.

This module does not import Prefect at module level, so the CLI can settle the API URL
before Prefect reads its settings.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from voxelflow.deid import voxelflow_home
from voxelflow.errors import ConfigurationError

DEFAULT_PORT = 4200

# Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which also switches off glibc's
# adaptive mmap threshold: every array over 128 KiB is then mmapped and page-faulted afresh,
# which slows conversion by most of its time again (README, "Why the defaults"). Keeping
# buffers up to 4 MiB on the heap restores the speed and still returns big arrays to the OS.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 * 1024 * 1024)}
STARTUP_TIMEOUT_S = 180


@dataclass
class PrefectAPI:
    api_url: str  # e.g. http://127.0.0.1:4200/api
    ui_url: str  # e.g. http://127.0.0.1:4200
    started_here: bool  # this call started the server


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_file(home: Path) -> Path:
    return home / "prefect-server.json"


def configured_api_url() -> str | None:
    """The API URL from the environment or the active Prefect profile, if any."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import PREFECT_API_URL  # reads the active profile

    return PREFECT_API_URL.value() or None


def local_server_status(home: Path | None = None) -> dict | None:
    """State of voxelflow's local server if it is running and healthy, else None."""
    state_path = _state_file(home or voxelflow_home())
    try:
        state = json.loads(state_path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return state if _healthy(state["api_url"]) else None


def start_local_server(home: Path | None = None, port: int | None = None,
                       timeout: float = STARTUP_TIMEOUT_S) -> PrefectAPI:
    """Start (or reuse) voxelflow's local Prefect server on loopback.

    Raises:
        ConfigurationError: the server did not become healthy in time (log tail included).
    """
    home = home or voxelflow_home()
    state = local_server_status(home)
    if state:
        return PrefectAPI(state["api_url"], state["ui_url"], started_here=False)
    home.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    ui_url = f"http://127.0.0.1:{port}"
    log_path = home / "prefect-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_API_URL": api_url,
    })
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)  # outlives this CLI call, so later runs reuse it
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _healthy(api_url):
            _state_file(home).write_text(json.dumps(
                {"pid": proc.pid, "port": port, "api_url": api_url, "ui_url": ui_url}))
            return PrefectAPI(api_url, ui_url, started_here=True)
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    raise ConfigurationError(
        f"the local Prefect server did not answer on {api_url} within {timeout:.0f} s; "
        f"log {log_path}:\n{tail}")


def stop_local_server(home: Path | None = None, timeout: float = 20.0) -> bool:
    """Stop voxelflow's local Prefect server. Returns whether one was running."""
    home = home or voxelflow_home()
    state_path = _state_file(home)
    try:
        state = json.loads(state_path.read_text())
    except (FileNotFoundError, ValueError):
        return False
    pid = int(state["pid"])
    try:
        os.killpg(pid, signal.SIGINT)
    except ProcessLookupError:
        state_path.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    state_path.unlink(missing_ok=True)
    return True


def ensure_prefect_api() -> PrefectAPI:
    """Use the configured Prefect API, or start/reuse the local server. Exports the URL in
    the environment so Dask worker processes started afterwards report to the same server.

    Raises:
        ConfigurationError: a configured API does not answer.
    """
    url = configured_api_url()
    if url:
        if not _healthy(url, timeout=5.0):
            raise ConfigurationError(f"the Prefect API at PREFECT_API_URL={url} does not answer /health")
        ui = os.environ.get("PREFECT_UI_URL") or url.rstrip("/").removesuffix("/api")
        api = PrefectAPI(url, ui, started_here=False)
    else:
        api = start_local_server()
        if api.started_here:
            # later commands then start without imports, as after `voxelflow server start`
            # (flows.warm); it comes up while this command runs
            from flows import warm

            warm.start(wait=False)
    os.environ["PREFECT_API_URL"] = api.api_url
    return api


def dask_task_runner(address: str | None = None, n_workers: int | None = None):
    """A DaskTaskRunner: an existing scheduler (``address`` or ``VOXELFLOW_DASK_ADDRESS``) or
    a LocalCluster of single-threaded worker processes sized to this machine."""
    from prefect_dask import DaskTaskRunner

    address = address or os.environ.get("VOXELFLOW_DASK_ADDRESS") or None
    if address:
        return DaskTaskRunner(address=address)
    n = n_workers or max(1, os.cpu_count() or 1)
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": ":0"})


# An input this small converts sooner in the command's own process (a thread per core) than a
# Dask cluster starts (~4 s of worker processes importing voxelflow: README, "Small runs").
SMALL_INPUT_FILES = 2000
SMALL_INPUT_BYTES = 512 * 2 ** 20


def small_input(sources: list[str], max_files: int = SMALL_INPUT_FILES, max_bytes: int = SMALL_INPUT_BYTES) -> int | None:
    """How many files ``sources`` (local files and folders; an archive counts as one file, by
    its size) hold, if at most ``max_files`` files and ``max_bytes`` bytes, else None. Stops
    counting as soon as either is passed; object storage is never small (listing it costs what
    it saves)."""
    files = size = 0
    for source in sources:
        if "://" in str(source):
            return None
        stack = [Path(source)]
        while stack:
            path = stack.pop()
            try:
                if path.is_dir():
                    stack.extend(path.iterdir())
                    continue
                size += path.stat().st_size
            except OSError:
                continue  # the ingest reports it, with its reason
            files += 1
            if files > max_files or size > max_bytes:
                return None
    return files


def task_runner(address: str | None = None, n_workers: int | None = None, in_process: bool = False):
    """Where a flow's tasks run: in this process's threads (``in_process``, a small input and
    no cluster named), or on Dask (:func:`dask_task_runner`)."""
    if in_process and not (address or os.environ.get("VOXELFLOW_DASK_ADDRESS")):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=n_workers or max(1, len(os.sched_getaffinity(0))))
    return dask_task_runner(address, n_workers)


def use_gpu(gpu: bool | None) -> bool:
    """Whether GPU workers take training and inference: as asked, else when this machine has
    a GPU (``None``)."""
    return bool(local_gpus()) if gpu is None else gpu


def local_gpus() -> int:
    """How many NVIDIA GPUs this machine exposes (device files; no CUDA import)."""
    import glob

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    return len(glob.glob("/dev/nvidia[0-9]*"))


def local_cluster(**kwargs):
    """A distributed.LocalCluster whose worker processes start with :data:`WORKER_ENV`
    (it must be set before the process starts: glibc reads it once)."""
    import dask
    from distributed import LocalCluster

    if local_gpus() and "resources" not in kwargs:
        kwargs["resources"] = {"GPU": 1}  # lets GPU-annotated tasks (training) run here
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}):
        return LocalCluster(**kwargs)
