"""Retry policy shared by voxelflow tasks: transient I/O only, never bad input."""

from __future__ import annotations

from voxelflow.errors import InvalidInputError


def transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry OS/store errors, not bad input or bugs."""
    try:
        state.result()
    except InvalidInputError:
        return False
    except OSError:  # StoreError is an OSError
        return True
    except Exception:  # noqa: BLE001 - a bug: retrying would hide it
        return False
    return False


RETRY = {"retries": 3, "retry_delay_seconds": [1, 5, 15], "retry_condition_fn": transient_only}
