"""voxelflow's own local Prefect server: started once, reused, stopped."""

from __future__ import annotations

import pytest

from voxelflow import runtime


@pytest.mark.slow
def test_local_server_is_started_once_and_reused(tmp_path):
    home = tmp_path / "home"
    port = runtime._free_port()
    try:
        first = runtime.start_local_server(home=home, port=port)
        assert first.started_here and first.api_url == f"http://127.0.0.1:{port}/api"
        assert runtime._healthy(first.api_url)
        second = runtime.start_local_server(home=home)
        assert not second.started_here and second.api_url == first.api_url
        assert runtime.local_server_status(home)["port"] == port
    finally:
        assert runtime.stop_local_server(home=home)
    assert not runtime._healthy(f"http://127.0.0.1:{port}/api")
    assert runtime.local_server_status(home) is None
