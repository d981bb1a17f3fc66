"""Faults: a Dask worker killed in the middle of an ingest run loses nothing — its tasks run on
the other worker and the store equals a clean run's; a Prefect server restart in the middle of
a nightly run is survived."""

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


def test_a_prefect_server_restart_during_a_run_is_survived(tmp_path):
    """The local Prefect server is stopped in the middle of a nightly run and started again on
    the same port (same database): the run goes on (Prefect's client retries while the server
    is away), exits 0, and the server records the run and every stage as completed."""
    import base64
    import json
    import subprocess
    import sys
    from urllib.parse import urlparse

    import httpx

    from flows import runtime
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    home = tmp_path / "home"
    api = runtime.start_local_server(home, timeout=120)
    port = urlparse(api.api_url).port
    try:
        archive = build_synthetic_archive(tmp_path / "archive", SynthConfig(patients=6, mr_patients=0,
                                                                             shape=(16, 48, 48)))
        key = tmp_path / "k.key"
        key.write_bytes(base64.b64encode(bytes(range(32))))
        config = tmp_path / "nightly.json"
        config.write_text(json.dumps({
            "sources": [str(archive / "images")], "store": str(tmp_path / "store"), "secret_file": str(key),
            "segmentations": str(archive / "labels" / "segmentations.csv"),
            "classes": str(archive / "labels" / "labels.csv"), "split": [0.5, 0.25, 0.25],
            "preprocess": {"spacing": [3.0, 3.0, 4.0]},
            "models": [{"name": "seg", "task": "segmentation", "settings": {
                "patch_size": [16, 32, 32], "epochs": 4, "steps_per_epoch": 4, "val_steps": 2, "batch_size": 2,
                "channels": [8, 16, 32]}}]}))
        env = {**os.environ, "PREFECT_API_URL": api.api_url, "VOXELFLOW_HOME": str(home)}
        log = open(tmp_path / "nightly.log", "wb")
        proc = subprocess.Popen([Path(sys.executable).parent / "voxelflow", "nightly", "--config", str(config),
                                 "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT)

        def runs() -> list[dict]:
            return httpx.post(f"{api.api_url}/flow_runs/filter", json={}, timeout=10).json()

        deadline = time.monotonic() + 300
        while not any(r["state_type"] == "COMPLETED" for r in runs()):  # the ingest stage is done
            assert proc.poll() is None, (tmp_path / "nightly.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the nightly run did not get going"
            time.sleep(0.5)
        assert runtime.stop_local_server(home)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{api.api_url}/health", timeout=2)
        time.sleep(15)  # the run goes on without a server (longer than a stage start takes)
        runtime.start_local_server(home, port=port, timeout=120)
        assert proc.wait(timeout=400) == 0, (tmp_path / "nightly.log").read_text()[-3000:]
        flows = {f["id"]: f["name"] for f in httpx.post(f"{api.api_url}/flows/filter", json={}, timeout=10).json()}
        completed = {flows[r["flow_id"]] for r in runs() if r["state_type"] == "COMPLETED"}
        assert completed == {"nightly", "ingest", "labels", "preprocess", "train", "infer", "qc"}
        assert sum(flows[r["flow_id"]] == "nightly" for r in runs()) == 1
    finally:
        runtime.stop_local_server(home)


def test_a_killed_ingest_leaves_no_partial_volume_and_the_rerun_completes(tmp_path, prefect_server):
    """kill -9 of the `voxelflow ingest` command in the middle of writing volumes: no volume
    that readers can open is partial, and running the same command again gives the store of a
    clean run."""
    import base64
    import subprocess
    import sys

    from voxelflow.ingest import IngestConfig, run_local
    from voxelflow.store import content_digest, open_volume
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    archive = build_synthetic_archive(tmp_path / "archive", SynthConfig(patients=10, mr_patients=1,
                                                                         shape=(32, 96, 96)))
    key = tmp_path / "k.key"
    key.write_bytes(base64.b64encode(bytes(range(32))))
    run_local(IngestConfig(sources=[str(archive / "images")], store=str(tmp_path / "clean"), secret_file=str(key)))
    store = tmp_path / "store"
    cmd = [Path(sys.executable).parent / "voxelflow", "ingest", str(archive / "images"), "--store", str(store),
           "--secret-file", str(key), "--workers", "2", "--batch-size", "8"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    log = open(tmp_path / "ingest.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list((store / "volumes").glob("v-*"))) < 3:
            assert proc.poll() is None, (tmp_path / "ingest.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no volume was written in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the CLI process, mid-run
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its Dask workers, as a lost machine would take them
        except ProcessLookupError:
            pass
    time.sleep(1)
    written = sorted(p.name for p in (store / "volumes").glob("v-*"))
    assert written and len(written) < 11
    for vid in written:  # every visible volume is complete: its voxels match its digest
        vol = open_volume(store, vid)
        assert content_digest(vol.array[...]) == vol.attributes["digest"]
    assert subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=400).returncode == 0
    assert _store_state(store) == _store_state(tmp_path / "clean")
    assert not list((store / ".staging").glob("*")) if (store / ".staging").exists() else True
