"""The ingest flow on a real Prefect server and a LocalCluster of 2 worker processes, and
de-identification checked everywhere the run writes: store, catalog, artifacts, logs."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import NIBABEL_DATA, dask_cli_cluster, ingest_config
from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series

PLANTED = {
    "PatientName": "PLANTEDSURNAME^XQZGIVEN",
    "PatientID": "PLANTEDPID9137",
    "PatientBirthDate": "19011231",
    "PatientAddress": "PLANTED STREET 42",
    "OtherPatientIDs": "PLANTEDOTHERID77",
    "InstitutionName": "PLANTED INSTITUTE XQZ",
    "InstitutionAddress": "PLANTED INSTITUTE ROAD",
    "AccessionNumber": "PLANTEDACC5521",
    "ReferringPhysicianName": "PLANTEDDOCTOR^XQZ",
    "ImageComments": "PLANTED COMMENT ABOUT THE PATIENT",
    "StudyDescription": "PLANTED STUDY DESCRIPTION",
    "SeriesDescription": "PLANTED SERIES DESCRIPTION",
    "StudyID": "PLANTEDSTUDYID",
}


@pytest.fixture(scope="module")
def planted_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    uids = set()
    for n in range(3):
        spec = SeriesSpec(patient_name=PLANTED["PatientName"], patient_id=PLANTED["PatientID"],
                          series_number=n + 1, extra={k: v for k, v in PLANTED.items()
                                                      if k not in ("PatientName", "PatientID")})
        uids |= {spec.study_uid, spec.series_uid, spec.frame_uid}
        for path in write_ct_series(ct_phantom((6, 32, 32), seed=n), root / "src" / f"s{n}", spec):
            import pydicom

            uids.add(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    (root / "src" / "notes.txt").write_text("export log")
    (root / "src" / "anatomical.nii").write_bytes((NIBABEL_DATA / "anatomical.nii").read_bytes())
    return root / "src", sorted(PLANTED.values()) + sorted(uids)


def _read_run(flow_run_id: str, *expect_logs: str):
    """The run, its logs, artifacts and task runs; waits (up to 60 s) until a log containing
    each of ``expect_logs`` has arrived: worker processes send theirs in batches."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(flow_run_id))
        deadline = time.monotonic() + 60
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            if all(any(e in log.message for log in logs) for e in expect_logs) or time.monotonic() > deadline:
                break
            time.sleep(1)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return run, logs, artifacts, task_runs


@pytest.mark.slow
def test_flow_on_local_cluster_deidentifies_everything(tmp_path, planted_source, prefect_server):
    from flows.ingest import run_ingest

    source, secrets = planted_source
    store = tmp_path / "store"
    config = ingest_config([source], store, batch_size=4, files_per_task=6)
    summary = run_ingest(config, n_workers=2)

    assert (summary["files"], summary["converted"], summary["skipped"], summary["failed"]) == (20, 19, 1, 0)
    assert summary["volumes"] == 4

    run, logs, artifacts, task_runs = _read_run(summary["flow_run_id"], "ingest done", "on worker pid")
    assert run.state.is_completed()
    names = sorted(t.name.rsplit("-", 1)[0] for t in task_runs)
    assert names.count("scan-headers") == 5  # 20 files in batches of 4: never a task per file
    assert names.count("convert-series") >= 2
    assert all(t.state.is_completed() for t in task_runs)
    pids = {int(m.group(1)) for log in logs if (m := re.search(r"on worker pid (\d+)", log.message))}
    assert pids and os.getpid() not in pids  # the work ran in Dask worker processes
    keys = {a.key for a in artifacts}
    assert {"ingest-summary", "ingest-catalog"} <= keys
    assert any(a.type == "progress" and float(a.data) == 100.0 for a in artifacts)
    summary_table = next(a for a in artifacts if a.key == "ingest-summary")
    table = summary_table.data if isinstance(summary_table.data, list) else json.loads(summary_table.data)
    assert {"metric": "volumes", "value": 4} in table

    # De-identification: no planted identifier anywhere the run wrote.
    texts = {"logs": [log.message for log in logs],
             "artifacts": [json.dumps([a.data, a.description, a.key], default=str) for a in artifacts],
             "catalog": [json.dumps(pq.read_table(p).to_pylist(), default=str)
                         for p in sorted((store / "catalog").glob("*.parquet"))],
             "parameters": [json.dumps(run.parameters, default=str)]}
    for path in sorted(Path(store).rglob("*")):
        if path.is_file():
            texts.setdefault("store files", []).append(path.read_bytes().decode("latin-1"))
    for where, blobs in texts.items():
        for secret in secrets:
            assert not any(secret in blob for blob in blobs), f"{secret!r} leaked into {where}"
    # The catalog holds pseudonyms instead.
    volumes = pq.read_table(store / "catalog" / "volumes.parquet").to_pylist()
    dicom = [v for v in volumes if v["kind"] == "dicom"]
    assert len({v["patient_id"] for v in dicom}) == 1 and dicom[0]["patient_id"].startswith("P-")
    assert len({v["series_id"] for v in dicom}) == 3


def test_pseudonyms_are_stable_per_store_and_differ_between_stores(tmp_path, planted_source):
    from voxelflow.ingest import run_local

    source, _ = planted_source
    ids = []
    for store in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):
        run_local(ingest_config([source], store))
        rows = pq.read_table(store / "catalog" / "volumes.parquet").to_pylist()
        ids.append(sorted((r["volume_id"], r["patient_id"] or "", r["series_id"] or "") for r in rows))
    assert ids[0] == ids[1]  # re-run into the same store: same pseudonyms
    patients = [{i[1] for i in run if i[1]} for run in ids]
    assert len(patients[0]) == 1 and patients[0].isdisjoint(patients[2])  # another store, another key


@pytest.mark.slow
def test_flow_on_an_existing_dask_cluster(tmp_path, planted_source, prefect_server):
    """`--dask-address`: a scheduler and worker processes started from the command line."""
    from distributed import Client

    from flows.ingest import run_ingest

    with dask_cli_cluster(tmp_path, prefect_server, ["--nworkers", "2"]) as (sched_file, _):
        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            address = client.scheduler.address
            worker_pids = set(client.run(os.getpid).values())
        source, _ = planted_source
        summary = run_ingest(ingest_config([source], tmp_path / "store", batch_size=8), dask_address=address)
    assert (summary["converted"], summary["volumes"]) == (19, 4)
    _, logs, _, _ = _read_run(summary["flow_run_id"], "ingest done", "on worker pid")
    pids = {int(m.group(1)) for log in logs if (m := re.search(r"on worker pid (\d+)", log.message))}
    assert pids and pids <= worker_pids
