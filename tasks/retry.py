"""Retry policy shared by voxelflow tasks: transient I/O only, never bad input."""

from __future__ import annotations

from voxelflow.errors import StoreError, VoxelflowError


def transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient storage errors (``StoreError`` and
    plain I/O errors), not bad input, settings, things missing from the store, or bugs."""
    try:
        state.result()
    except StoreError:
        return True
    except (VoxelflowError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        return False  # logical: the same call fails the same way again
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - a bug: retrying would hide it
        return False
    return False


RETRY = {"retries": 3, "retry_delay_seconds": [1, 5, 15], "retry_condition_fn": transient_only}
