"""What a user sees: a small ingest runs in the command's own process (no Dask cluster to
start), the terminal shows warnings, bars and the result while Prefect's and Dask's INFO lines
go to a log file, ``-v`` shows them, and metrics are printed under their names."""

from __future__ import annotations

import re

import pytest

from flows.runtime import small_input
from flows.terminal import named_metrics
from tests.conftest import run_cli, task_pids


def test_small_input_counts_files_and_bytes_and_stops_early(study, tmp_path):
    assert small_input([str(study)]) == 25
    assert small_input([str(study)], max_files=10) is None
    assert small_input([str(study)], max_bytes=1000) is None
    assert small_input(["s3://bucket/archive"]) is None  # listing object storage costs what it saves
    assert small_input([str(tmp_path / "missing")]) == 0  # the ingest reports it, with its reason


@pytest.mark.slow
def test_a_small_ingest_runs_in_process_quietly_and_logs_to_a_file(study, tmp_path, prefect_server):
    proc = run_cli("ingest", study, "--store", tmp_path / "store", env={"VOXELFLOW_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_path = re.search(r"^log: (\S+)$", proc.stderr, re.M).group(1)
    log_text = open(log_path).read()
    # every task ran in one process, and no cluster was started: the tasks' own log lines say
    # which process ran them, and Prefect's Dask runner logs the cluster it creates
    assert "Task run 'scan-headers" in log_text and "Task run 'convert-series" in log_text
    assert len(task_pids(log_text)) == 1 and "Creating a new Dask cluster" not in log_text
    # the terminal: no task lines, the summary table, the bars' phases, the UI link; bounded
    terminal = proc.stdout + proc.stderr
    assert "Task run" not in terminal and "Flow run" not in terminal
    assert "Run in the Prefect UI: http" in proc.stdout and "converted" in proc.stdout
    assert "scanning headers of 25 files" in proc.stderr and "converting 24 files, 2 series" in proc.stderr
    assert len(terminal.splitlines()) <= 25, terminal


@pytest.mark.slow
def test_verbose_shows_the_task_lines_and_workers_take_an_explicit_worker_count(study, tmp_path, prefect_server):
    proc = run_cli("ingest", study, "--store", tmp_path / "store", "-v", "--workers", "2",
                   env={"VOXELFLOW_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Task run 'scan-headers" in proc.stderr
    log_text = open(re.search(r"^log: (\S+)$", proc.stderr, re.M).group(1)).read()
    assert "Creating a new Dask cluster" in log_text and "Task run 'convert-series" in log_text
    assert proc.stderr.count("Task run 'scan-headers") >= 1


def test_metrics_are_printed_under_their_names():
    row = {"epoch": 14, "train_loss": 0.0057, "accuracy": 1.0, "f1": 1.0, "roc_auc": 1.0, "margin": 0.9233,
           "threshold": 0.5132, "monitor": 1.0092, "lr": 1e-5, "samples_per_s": 442.8}
    text = named_metrics(row)
    assert text == "accuracy 1.000, F1 1.000, ROC-AUC 1.000 (margin 0.92), threshold 0.513"
    assert "1.009" not in text  # the monitor (a metric plus its tie-breaker) is never shown bare
    assert named_metrics({"dice_1": 0.9644, "hd95_mm_1": 4.154, "dice": 0.9644}) == \
        "Dice class 1 0.964, HD95 mm class 1 4.154, Dice 0.964"
