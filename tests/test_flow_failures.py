"""A task that keeps failing on I/O is retried, then its files are accounted as failed and the
run completes; bad input is never retried."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.conftest import ingest_config
from voxelflow.errors import CorruptFileError, StoreError
from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series


def test_persistent_io_error_is_retried_then_recorded(tmp_path, monkeypatch, prefect_server):
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.ingest as flow_module
    import tasks.ingest as task_module

    write_ct_series(ct_phantom((4, 16, 16)), tmp_path / "src" / "a", SeriesSpec())
    (tmp_path / "src" / "note.txt").write_text("x")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise StoreError("store volume went away")

    monkeypatch.setattr(task_module.ingest, "convert_jobs", broken)
    monkeypatch.setattr(flow_module, "convert_series",
                        task_module.convert_series.with_options(retry_delay_seconds=0))
    run = flow_module.ingest_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    summary = run(ingest_config([tmp_path / "src"], tmp_path / "store"))

    assert len(calls) == 4  # first try + 3 retries
    assert (summary["files"], summary["failed"], summary["skipped"], summary["volumes"]) == (5, 4, 1, 0)
    rows = pq.read_table(tmp_path / "store" / "catalog" / "files.parquet").to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 4
    assert all(r["reason"] == "conversion failed: StoreError: store volume went away" for r in failed)


def test_a_scan_batch_that_keeps_failing_is_recorded(tmp_path, monkeypatch, prefect_server):
    """A header-scan batch failing for good: its files (read back from the run's listing) are
    accounted as failed with the reason, the other batches go on, the run completes."""
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.ingest as flow_module
    import tasks.ingest as task_module

    src = tmp_path / "src"
    write_ct_series(ct_phantom((4, 16, 16)), src / "a", SeriesSpec())
    (src / "note.txt").write_text("x")
    real = task_module.ingest.scan_batch

    def flaky(entries, key, out_path):
        if out_path.endswith("000000.parquet"):  # the first batch: note.txt and the first slice
            raise StoreError("scratch disk went away")
        return real(entries, key, out_path)

    monkeypatch.setattr(task_module.ingest, "scan_batch", flaky)
    monkeypatch.setattr(flow_module, "scan_headers", task_module.scan_headers.with_options(retry_delay_seconds=0))
    run = flow_module.ingest_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    summary = run(ingest_config([src], tmp_path / "store", batch_size=2))

    assert summary["files"] == 5
    rows = pq.read_table(tmp_path / "store" / "catalog" / "files.parquet").to_pylist()
    failed = sorted(r["path"] for r in rows if r["reason"] == "header scan failed: StoreError: scratch disk went away")
    first_slice = sorted(p.name for p in (src / "a").iterdir())[0]
    assert failed == [f"a/{first_slice}", "note.txt"]
    assert len(rows) == 5 and all(r["status"] in ("converted", "failed", "skipped") for r in rows)


@pytest.mark.parametrize("exc,retry", [
    (StoreError("disk full"), True),
    (OSError("connection reset"), True),
    (CorruptFileError("a.dcm", "truncated"), False),
    (RuntimeError("a bug"), False),
])
def test_retry_condition(exc, retry):
    from prefect.states import Failed

    from tasks.retry import transient_only

    assert transient_only(None, None, Failed(data=exc)) is retry
