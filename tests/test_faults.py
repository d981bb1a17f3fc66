"""Faults: a Dask worker killed in the middle of an ingest run loses nothing — its tasks run on
the other worker and the store equals a clean run's."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import dask_cli_cluster
from voxelflow import catalog

pytestmark = pytest.mark.slow


def _store_state(store: Path) -> tuple:
    vols = sorted((r["volume_id"], r["digest"], tuple(r["shape"])) for r in catalog.read_table(store, "volumes").to_pylist())
    files = sorted((r["path"], r["status"], r["volume_id"]) for r in catalog.read_table(store, "files").to_pylist())
    return vols, files


def test_a_killed_worker_loses_nothing(tmp_path, prefect_server):
    import base64

    from distributed import Client

    from flows.ingest import run_ingest
    from voxelflow.ingest import IngestConfig, run_local
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    archive = build_synthetic_archive(tmp_path / "archive", SynthConfig(patients=8, mr_patients=1,
                                                                         shape=(24, 64, 64)))
    key = tmp_path / "k.key"
    key.write_bytes(base64.b64encode(bytes(range(32))))

    def config(store):
        return IngestConfig(sources=[str(archive / "images")], store=str(store), secret_file=str(key), batch_size=16)

    run_local(config(tmp_path / "clean"))
    # two separate worker processes, no nanny: a kill is a lost machine
    with dask_cli_cluster(tmp_path, prefect_server, ["--no-nanny"], ["--no-nanny"]) as (sched_file, procs):
        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            address = client.scheduler.address
            pid_of = client.run(os.getpid)  # worker address -> process id
            result: dict = {}

            def run():
                try:
                    result["summary"] = run_ingest(config(tmp_path / "store"), dask_address=address)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    result["error"] = exc

            thread = threading.Thread(target=run)
            thread.start()
            victim = procs[1]
            killed = False
            seen: set = set()
            deadline = time.monotonic() + 240
            while thread.is_alive() and time.monotonic() < deadline and not killed:
                busy = client.processing()  # worker address -> keys it is running
                seen.update(str(k) for keys in busy.values() for k in keys)
                for addr, keys in busy.items():
                    if keys and pid_of.get(addr) == victim.pid and any("convert_series" in str(k) for k in keys):
                        victim.send_signal(signal.SIGKILL)
                        killed = True
                        break
                time.sleep(0.05)
            thread.join(timeout=300)
        assert killed, f"the run ended before a conversion reached the worker to kill (running: {sorted(seen)[:10]})"
        assert "error" not in result, result.get("error")
        assert victim.wait(timeout=10) == -signal.SIGKILL
        assert _store_state(tmp_path / "store") == _store_state(tmp_path / "clean")
