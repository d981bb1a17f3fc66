"""Run progress shown twice: a Prefect progress artifact (UI) and a bar in the terminal."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    """Counts work units; pushes the percentage to the UI at most every ``interval`` s."""

    def __init__(self, total: int, description: str, interval: float = 1.0):
        self.total = max(1, total)
        self.done = 0
        self.interval = interval
        self._last_push = 0.0
        self.artifact_id = create_progress_artifact(progress=0.0, description=description)
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(),
                             console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task(description, total=self.total)
        self._bar.start()

    def phase(self, description: str) -> None:
        self._bar.update(self._task, description=description)

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        self._bar.update(self._task, completed=self.done)
        now = time.monotonic()
        if now - self._last_push >= self.interval or self.done == self.total:
            update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
            self._last_push = now

    def close(self) -> None:
        self.done = self.total
        self._bar.update(self._task, completed=self.total)
        update_progress_artifact(self.artifact_id, progress=100.0)
        self._bar.stop()
