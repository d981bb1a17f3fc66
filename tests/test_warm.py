"""The warm runner (``voxelflow server start``): a command runs in a child of a process that has
imported voxelflow and Prefect, as it would run alone (terminal, status, errors, Ctrl-C), and
the runner serves only the environment and the sources it started with."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time

import pytest

from flows import warm
from tests.conftest import run_cli, task_pids


@contextlib.contextmanager
def _runner(tmp_path, monkeypatch):
    """A warm runner in a home of the test's own: (home, pid); stopped at the end. Started from
    the test's body: the runner serves the environment it started in, and pytest's own
    variables differ between a fixture's set-up and the test."""
    home = tmp_path / "home"
    monkeypatch.setenv("VOXELFLOW_HOME", str(home))
    pid = warm.start(home)
    assert pid, (home / warm.LOG_NAME).read_text()
    try:
        yield home, pid
    finally:
        warm.stop(home)


def _served(home) -> list[int]:
    """The pids of the children the runner forked, from its log."""
    return [int(p) for p in re.findall(r"^\d\d:\d\d:\d\d pid (\d+): voxelflow ", (home / warm.LOG_NAME).read_text(),
                                       re.M)]


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not warm.alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_a_command_runs_in_a_child_of_the_runner_as_it_would_alone(study, tmp_path, monkeypatch, prefect_server):
    with _runner(tmp_path, monkeypatch) as (home, runner):
        proc = run_cli("ingest", study, "--store", tmp_path / "store")
        assert proc.returncode == 0, proc.stderr[-3000:]
        [child] = _served(home)
        assert child != runner
        # the tasks ran in that child (a small input runs in the command's process), and the
        # terminal and the log file are the command's, as without the runner
        log_text = open(re.search(r"^log: (\S+)$", proc.stderr, re.M).group(1)).read()
        assert task_pids(log_text) == {child}
        assert "Run in the Prefect UI: http" in proc.stdout and "converted" in proc.stdout
        assert "scanning headers of 25 files" in proc.stderr and "Task run" not in proc.stderr

        # a failing command: its one-line error on the client's stderr and its status
        bad = run_cli("ingest", tmp_path / "missing", "--store", tmp_path / "store")
        assert bad.returncode == 2 and "source(s) not found" in bad.stderr
        assert len(_served(home)) == 2

        # another environment: the command runs in its own process, the runner stays
        other = run_cli("catalog", tmp_path / "store", "SELECT count(*) AS n FROM volumes",
                        env={"VOXELFLOW_TEST_OTHER": "1"})
        assert other.returncode == 0, other.stderr[-3000:]
        assert re.search(r"\b2\b", other.stdout) and len(_served(home)) == 2
        assert warm.status(home)["pid"] == runner
    assert _gone(runner) and warm.status(home) is None  # stopped


@pytest.mark.slow
def test_ctrl_c_reaches_the_command_and_its_status_comes_back(study, tmp_path, monkeypatch, prefect_server):
    with _runner(tmp_path, monkeypatch) as (home, runner):
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", str(study), "--store",
                                 str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stderr:  # the command is under way in the child: it has found the API
            seen.append(line)
            if line.startswith("Prefect API:"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, "".join(seen) + err
        assert "interrupted" in err
        [child] = _served(home)
        assert _gone(child)
        assert warm.status(home)["pid"] == runner  # the runner goes on serving


@pytest.mark.slow
def test_the_runner_refuses_other_environments_and_starts_again_for_new_sources(tmp_path, monkeypatch,
                                                                                 prefect_server):
    assert warm.run_warm(["catalog", "x", "SELECT 1"], tmp_path / "home") is None  # no runner yet
    with _runner(tmp_path, monkeypatch) as (home, runner):
        assert warm.run_warm(["server", "status"], home) is None  # never through the runner
        with monkeypatch.context() as m:
            m.setenv("VOXELFLOW_TEST_OTHER", "1")
            assert warm.run_warm(["catalog", "x", "SELECT 1"], home) is None
        assert warm.status(home)["pid"] == runner
        # sources edited since the runner imported them: refused, and the runner execs itself
        # again (same pid) to import the new ones
        with monkeypatch.context() as m:
            m.setattr(warm, "sources_stamp", lambda: "0" * 16)
            assert warm.run_warm(["catalog", "x", "SELECT 1"], home) is None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (home / warm.LOG_NAME).read_text().count("warm runner pid") < 2:
            time.sleep(0.2)
        log = (home / warm.LOG_NAME).read_text()
        assert "sources changed: starting again" in log and log.count(f"warm runner pid {runner} ") == 2, log
        assert _served(home) == []
