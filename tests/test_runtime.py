"""With no Prefect server configured, the CLI starts voxelflow's local server once and the warm
runner beside it, later runs reuse them (a run on a Dask cluster in a child of the runner
too), and `voxelflow server stop` stops both."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import NIBABEL_DATA, run_cli
from flows import runtime, warm


@pytest.mark.slow
def test_cli_without_a_configured_server_starts_and_reuses_one(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"VOXELFLOW_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect-profile")}

    def cli(*args):
        return run_cli(*args, env=env, inherit=False, timeout=400)

    try:
        first = cli("ingest", NIBABEL_DATA / "anatomical.nii", "--store", tmp_path / "s1", "--workers", "1")
        assert first.returncode == 0, first.stderr[-3000:]
        assert "(started a local server)" in first.stderr
        state = runtime.local_server_status(home)
        assert state and state["api_url"] in first.stderr
        assert f"Run in the Prefect UI: {state['ui_url']}/runs/flow-run/" in first.stdout
        deadline = time.monotonic() + 120  # the warm runner comes up while the first command runs
        while warm.status(home) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        runner = warm.status(home)
        assert runner, (home / warm.LOG_NAME).read_text()

        second = cli("ingest", NIBABEL_DATA / "anatomical.nii", "--store", tmp_path / "s2", "--workers", "1")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "started a local server" not in second.stderr and state["api_url"] in second.stderr
        assert runtime.local_server_status(home)["pid"] == state["pid"]  # the same server process
        # ... and it ran in a child of the runner, its Dask worker processes started from there
        assert "voxelflow ingest" in (home / warm.LOG_NAME).read_text()
    finally:
        stop = cli("server", "stop")
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert runtime.local_server_status(home) is None and warm.status(home) is None
    assert not runtime._healthy(state["api_url"]) and not warm.alive(runner["pid"])
