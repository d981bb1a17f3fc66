"""What a command shows on the terminal: warnings, errors, a progress bar per phase and its
result; everything else (Prefect's and Dask's per-task INFO lines) goes to a log file.

:func:`quiet_logging` writes a Prefect logging configuration for the command (console at
WARNING, or INFO with ``-v``; a file handler at INFO) and points ``PREFECT_LOGGING_CONFIG_PATH``
at it before Prefect is imported; Dask worker processes started afterwards inherit the variable,
so their task logs land in the same file. The Prefect UI still receives every log line (its API
handler is untouched).

:class:`ProgressBars` draws the command's Prefect progress artifacts (ingest phases, training
epochs, inference volumes) as terminal bars, polled from the API: the work runs in Dask worker
processes whose own output the terminal does not show.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import yaml

from voxelflow.deid import voxelflow_home


def quiet_logging(command: str, verbose: bool = False, home: Path | None = None) -> Path:
    """Configure this process's (and its future children's) logging for ``command``; returns
    the log file's path."""
    import importlib.util

    logs = (home or voxelflow_home()) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    log_file = logs / f"{command}-{stamp}-{uuid.uuid4().hex[:6]}.log"
    # Prefect's own default configuration, read as a file (importing Prefect would configure
    # its logging before this one is in place)
    spec = importlib.util.find_spec("prefect")
    default = Path(spec.origin).parent / "logging" / "logging.yml"
    config = yaml.safe_load(default.read_text())
    config["handlers"]["console"]["level"] = "INFO" if verbose else "WARNING"
    config["handlers"]["file"] = {"class": "logging.FileHandler", "level": "INFO", "formatter": "standard",
                                  "filename": str(log_file), "mode": "a", "encoding": "utf-8"}
    config["root"]["handlers"] = ["console", "file"]
    for name in ("uvicorn", "fastapi"):
        config["loggers"][name]["handlers"] = ["console", "file"]
    settings = logs / f".logging-{log_file.stem}.yml"
    settings.write_text(yaml.safe_dump(config, sort_keys=False))
    os.environ["PREFECT_LOGGING_CONFIG_PATH"] = str(settings)
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "info" if verbose else "warning"
    log_file.touch()
    reconfigure_prefect_logging()
    return log_file


def reconfigure_prefect_logging() -> None:
    """Apply the environment's Prefect logging configuration again when Prefect is already
    imported (a command in a warm runner's child, :mod:`flows.warm`): Prefect reads it once, at
    import, into handlers bound to the streams of that moment."""
    import logging
    import sys

    if "prefect" not in sys.modules:
        return  # the import will read it
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    refresh_global_settings_context()
    logging.getLogger().handlers.clear()  # else Prefect keeps the old root handlers as "the user's"
    setup_logging(incremental=False)


class ProgressBars:
    """Terminal bars for the progress artifacts of the flow runs tagged ``tag`` (the command's
    flow and its subflows), refreshed every ``interval`` seconds from the Prefect API; a bar
    per artifact (one per phase, model or stage), finished when the command ends."""

    def __init__(self, tag: str, interval: float = 0.5, enabled: bool = True):
        self.tag, self.interval, self.enabled = tag, interval, enabled
        self._stop = threading.Event()
        self._bars: dict[str, int] = {}

    def __enter__(self) -> ProgressBars:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                  TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self._progress.start()
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress-bars")
        self._thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._refresh(final=exc_type is None)
        except Exception:  # the API the command failed to reach, say: its own error is the one to show
            pass
        finally:
            self._progress.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._refresh()
            except Exception:  # a bar is a nicety: an API hiccup must not end the command
                pass

    def _refresh(self, final: bool = False) -> None:
        url = os.environ.get("PREFECT_API_URL")
        if not url:
            return  # not yet settled by the command: a client now would start a temporary server
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterType,
            FlowRunFilter,
            FlowRunFilterTags,
        )

        from prefect.settings import PREFECT_API_URL, temporary_settings

        # this thread's settings are Prefect's import-time ones, not the command's API
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[self.tag])))
            if not runs:
                return
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                type=ArtifactFilterType(any_=["progress"]), flow_run_id=ArtifactFilterFlowRunId(
                    any_=[r.id for r in runs])))
        for art in sorted(artifacts, key=lambda a: a.created):
            key = str(art.id)
            if key not in self._bars:
                self._bars[key] = self._progress.add_task(art.description or "progress", total=100.0)
            done = float(art.data or 0.0)
            if final and done < 100.0:
                continue  # an unfinished phase stays where it stopped
            self._progress.update(self._bars[key], completed=done)


# metric keys as people write them; class-indexed keys (dice_1) get the class after the name
# (others: the key with spaces, "patch accuracy")
_METRIC_NAMES = {"roc_auc": "ROC-AUC", "f1": "F1", "macro_f1": "macro F1", "dice": "Dice", "hd95_mm": "HD95 mm",
                 "psnr": "PSNR dB", "ssim": "SSIM", "mse": "MSE", "patch_roc_auc": "patch ROC-AUC",
                 "patch_f1": "patch F1"}
# what a metrics row holds besides metrics
_NOT_METRICS = {"epoch", "train_loss", "lr", "seconds", "samples_per_s", "data_wait_share", "monitor", "margin",
                "rank_samples_per_s", "world_size", "threshold", "patch_samples"}


def named_metrics(row: dict) -> str:
    """A metrics row as ``ROC-AUC 1.000 (margin 0.81), F1 1.000, ...``: each under its name;
    the early-stopping ``monitor`` (a metric plus a tie-breaker) never as a bare number."""
    parts = []
    for key, value in row.items():
        if key in _NOT_METRICS or isinstance(value, bool):
            continue
        base, _, cls = key.rpartition("_") if key.rpartition("_")[2].isdigit() else (key, "", "")
        name = _METRIC_NAMES.get(base, base.replace("_", " ")) + (f" class {cls}" if cls else "")
        if isinstance(value, float):
            text = f"{name} {value:.3f}"
        elif isinstance(value, int):
            text = f"{name} {value}"
        else:
            text = f"{name} {json.dumps(value)}"
        if key == "roc_auc" and isinstance(row.get("margin"), float):
            text += f" (margin {row['margin']:.2f})"
        parts.append(text)
    if isinstance(row.get("threshold"), float):
        parts.append(f"threshold {row['threshold']:.3f}")
    return ", ".join(parts) or "-"


def run_tag() -> str:
    """A tag naming one command's flow runs (for :class:`ProgressBars`)."""
    return f"voxelflow-cli-{uuid.uuid4().hex[:12]}"

