"""Run progress as a Prefect progress artifact: a bar in the UI, and in the terminal of the
command that started the run (``flows.terminal.ProgressBars`` draws the run's artifacts)."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class RunProgress:
    """Counts the work units of one phase; pushes the percentage at most every ``interval`` s."""

    def __init__(self, total: int, description: str, interval: float = 0.5):
        self.total = max(1, total)
        self.done = 0
        self.interval = interval
        self._last_push = 0.0
        self.artifact_id = create_progress_artifact(progress=0.0, description=description)

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        now = time.monotonic()
        if now - self._last_push >= self.interval or self.done == self.total:
            update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
            self._last_push = now

    def close(self) -> None:
        self.done = self.total
        update_progress_artifact(self.artifact_id, progress=100.0)
