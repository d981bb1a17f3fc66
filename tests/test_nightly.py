"""The nightly flow: every stage as a subflow, safe to re-run, a failed stage fails the run
visibly and keeps what earlier stages wrote; deployments for `voxelflow serve`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_TRAIN
from voxelflow import catalog, registry
from flows.nightly_config import ModelSpec, NightlyConfig

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    root = tmp_path_factory.mktemp("nightly")
    build_synthetic_archive(root / "archive", SynthConfig(patients=6, mr_patients=0, shape=(16, 48, 48)))
    return root


def _config(root, **kw) -> NightlyConfig:
    import base64

    key = root / "nightly.key"
    key.write_bytes(base64.b64encode(bytes(range(32))))
    a = root / "archive"
    settings = dict(sources=[str(a / "images")], store=str(root / "store"), secret_file=str(key),
                    segmentations=str(a / "labels" / "segmentations.csv"), classes=str(a / "labels" / "labels.csv"),
                    split=(0.5, 0.25, 0.25), preprocess={"spacing": [3.0, 3.0, 4.0]},
                    models=[ModelSpec(name="seg", task="segmentation", settings=TINY)])
    return NightlyConfig(**(settings | kw))


@pytest.mark.slow
def test_nightly_runs_every_stage_and_reruns_safely(archive, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.nightly import run_nightly

    config = _config(archive)
    first = run_nightly(config, n_workers=2)
    assert [s["stage"] for s in first["stages"]] == [
        "ingest", "labels", "preprocess", "train seg", "infer seg", "qc"]
    assert registry.current(config.store, "seg")["version"] == first["models"]["seg"]["version"]
    predicted = [r for r in catalog.read_table(config.store, "predictions").to_pylist() if r["model"] == "seg"]
    labelled = {r["volume_id"] for r in catalog.read_table(config.store, "labels").to_pylist()}
    assert {r["volume_id"] for r in predicted} == labelled  # every preprocessed volume predicted
    # the QC gallery: every volume, tonight's predictions among its outlines
    index = json.loads((Path(config.store) / "qc" / "index.json").read_text())
    assert {v["volume_id"] for v in index["volumes"]} == {
        r["volume_id"] for r in catalog.read_table(config.store, "volumes").to_pylist()}
    assert {p["model"] for v in index["volumes"] for p in v["predictions"]} == {"seg"}
    assert first["stages"][-1]["detail"].endswith("index.html")
    splits = catalog.read_table(config.store, "splits").to_pylist()
    # the same night again: nothing is lost or redone that need not be
    second = run_nightly(config, n_workers=2)
    detail = {s["stage"]: s["detail"] for s in second["stages"]}
    assert "0 processed" in detail["preprocess"] and "0 predicted" in detail["infer seg"]
    assert second["models"]["seg"]["version"] == first["models"]["seg"]["version"]
    assert catalog.read_table(config.store, "splits").to_pylist() == splits
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["nightly"])))
        assert arts and "preprocess" in json.dumps(arts[0].data)
        gallery = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["qc-gallery"]))) if str(config.store) in a.data]  # other tests' too
        assert gallery and all("index.html" in a.data and "data:image/png;base64," in a.data for a in gallery)
        runs = client.read_flow_runs()
    names = {client_run.name for client_run in runs}
    assert names  # subflow runs are recorded under the nightly run
    parents = [r for r in runs if r.parent_task_run_id is not None]
    assert len(parents) >= 5 * 2  # five stage subflows per nightly run


@pytest.mark.slow
def test_a_failed_stage_fails_the_run_and_keeps_earlier_work(archive, prefect_server):
    from flows.nightly import run_nightly

    root = archive
    config = _config(root, models=[ModelSpec(name="bad", task="classification",
                                             settings=TINY | {"positive_class": "tumour", "positive_label": 2})])
    config = config.model_copy(update={"store": str(root / "store-fail")})
    with pytest.raises(ValueError, match="tumour"):
        run_nightly(config, n_workers=1)
    # ingest, labels and preprocessing stay: the next night starts from them
    assert catalog.read_table(config.store, "volumes").num_rows == 6
    assert catalog.read_table(config.store, "splits").num_rows == 6
    pre = list((root / "store-fail" / "preprocessed").iterdir())
    assert len(pre) == 1 and registry.current(config.store, "bad") is None


def test_config_file_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "nightly.json"
    path.write_text(json.dumps({"sources": ["../data", "s3://bucket/archive"], "store": "../store",
                                "models": [{"name": "seg", "task": "segmentation", "settings": {"epochs": 3}}]}))
    config = NightlyConfig.from_file(path)
    assert config.sources == [str(tmp_path / "data"), "s3://bucket/archive"]
    assert config.store == str(tmp_path / "store")
    assert config.train_run(config.models[0], "v1").train.optimisation.epochs == 3
    assert NightlyConfig.from_file(path, store="/elsewhere").store == "/elsewhere"
    from voxelflow.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="missing.json"):
        NightlyConfig.from_file(tmp_path / "missing.json")


def test_serve_builds_the_deployments_of_prefect_yaml(tmp_path):
    """`voxelflow serve` and `prefect deploy` read one definition, deployment/prefect.yaml: the
    same names, entrypoints and parameters; the schedule in the time zone asked for (and a
    --cron replaces the file's)."""
    from flows.deployments import declared, runner_deployments

    path = tmp_path / "nightly.json"
    path.write_text(NightlyConfig(sources=[str(tmp_path)], store=str(tmp_path / "store")).model_dump_json())
    deps = {d.name: d for d in runner_deployments(path, "Europe/Berlin")}
    entries = {e["name"]: e for e in declared()}
    assert set(deps) == set(entries) == {"voxelflow-nightly", "voxelflow-ingest", "voxelflow-infer"}
    for name, dep in deps.items():
        assert dep.entrypoint.endswith(entries[name]["entrypoint"].split("/")[-1])
        assert dep.parameters == {"config_file": str(path.resolve())}
    schedule = deps["voxelflow-nightly"].schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == (entries["voxelflow-nightly"]["schedules"][0]["cron"], "Europe/Berlin")
    assert not deps["voxelflow-ingest"].schedules and not deps["voxelflow-infer"].schedules
    again = {d.name: d for d in runner_deployments(path, "UTC", cron="30 1 * * *")}
    assert again["voxelflow-nightly"].schedules[0].schedule.cron == "30 1 * * *"


@pytest.mark.slow
def test_prefect_yaml_deploys_to_work_pools_with_the_nightly_schedule(prefect_server, tmp_path):
    """`prefect deploy --all --prefect-file deployment/prefect.yaml` against a real server: three
    deployments on the CPU / GPU pools, the nightly one at 02:00 in the configured time zone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect.client.orchestration import get_client

    repo = Path(__file__).resolve().parents[1]
    prefect = [sys.executable, "-m", "prefect"]
    env = os.environ | {"PREFECT_API_URL": prefect_server, "VOXELFLOW_REPO": str(repo),
                        "VOXELFLOW_NIGHTLY_CONFIG": str(repo / "deployment" / "nightly.json"),
                        "VOXELFLOW_TIMEZONE": "Europe/Berlin"}
    for pool in ("voxelflow-cpu", "voxelflow-gpu"):
        subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env,
                       check=True, capture_output=True, timeout=120)
    proc = subprocess.run([*prefect, "--no-prompt", "deploy", "--all", "--prefect-file",
                           str(repo / "deployment" / "prefect.yaml")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments() if d.name.startswith("voxelflow-")}
    assert {"voxelflow-nightly", "voxelflow-ingest", "voxelflow-infer"} <= set(deps)
    nightly = deps["voxelflow-nightly"]
    assert nightly.work_pool_name == "voxelflow-gpu" and deps["voxelflow-ingest"].work_pool_name == "voxelflow-cpu"
    schedule = nightly.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert nightly.parameters["config_file"] == env["VOXELFLOW_NIGHTLY_CONFIG"]
    NightlyConfig.from_file(nightly.parameters["config_file"])  # the shipped example parses
    try:
        # serve would take over these names and keep their pools; it refuses, naming them
        config = tmp_path / "nightly.json"
        config.write_text(NightlyConfig(sources=[str(tmp_path)], store=str(tmp_path / "store")).model_dump_json())
        served = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--config", str(config)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert served.returncode == 2, served.stdout[-3000:] + served.stderr[-3000:]
        assert "nightly/voxelflow-nightly (work pool voxelflow-gpu)" in served.stderr
        assert "prefect deployment delete" in served.stderr
    finally:
        with get_client(sync_client=True) as client:
            for dep in deps.values():
                client.delete_deployment(dep.id)


@pytest.mark.slow
def test_voxelflow_serve_runs_deployments_and_stops_cleanly(archive, prefect_server, tmp_path):
    """`voxelflow serve` as a user starts it: the deployments appear with their schedule, a run
    of the ingest deployment triggered from the API executes, and SIGINT stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    config = _config(archive).model_copy(update={"store": str(tmp_path / "served-store"), "models": []})
    path = tmp_path / "nightly.json"
    path.write_text(config.model_dump_json())
    env = os.environ | {"PREFECT_API_URL": prefect_server, "VOXELFLOW_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--config", str(path), "--workers", "1",
                             "--timezone", "America/New_York"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        found = None
        with get_client(sync_client=True) as client:
            while found is None:
                assert proc.poll() is None, proc.stdout.read()[-3000:]  # serve must still be running
                assert time.monotonic() < deadline, "voxelflow serve registered no deployments in 120 s"
                time.sleep(2)
                try:
                    found = client.read_deployment_by_name("ingest-from-config/voxelflow-ingest")
                    nightly = client.read_deployment_by_name("nightly/voxelflow-nightly")
                except ObjectNotFound:
                    found = None
            assert nightly.schedules[0].schedule.timezone == "America/New_York"
        run = run_deployment("ingest-from-config/voxelflow-ingest", timeout=240)
        assert run.state.is_completed(), run.state
        assert catalog.read_table(config.store, "volumes").num_rows == 6
    finally:
        proc.send_signal(signal.SIGINT)
        # voxelflow serve exits within a minute of the signal even if Prefect's runner hangs
        # waiting on a run's subprocess (seen late in the suite on 2 loaded cores)
        out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped" in out


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_a_cluster_started_from_the_command_line(archive, prefect_server, tmp_path):
    """`dask scheduler` + two `dask worker` processes: every stage of the nightly run (ingest,
    labels, preprocess, train, infer) runs its tasks there, in the worker processes; the model
    is cross-validated (2 folds), each fold trained by 2 data-parallel ranks, and inferred with
    the folds' ensemble."""
    import os

    from distributed import Client

    from flows.nightly import run_nightly
    from tests.conftest import dask_cli_cluster

    spec = ModelSpec(name="seg", task="segmentation", settings=TINY, world_size=2, folds=2, ensemble=True)
    config = _config(archive, models=[spec]).model_copy(update={"store": str(tmp_path / "store")})
    with dask_cli_cluster(tmp_path, prefect_server, ["--nworkers", "2"]) as (sched_file, _):
        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            address = client.scheduler.address
            workers = set(client.run(os.getpid).values())
            summary = run_nightly(config, dask_address=address)
            # tasks each worker process executed (Prefect tasks of every stage run there)
            done = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert [s["stage"] for s in summary["stages"]] == [
        "ingest", "labels", "preprocess", "train seg", "infer seg", "qc"]
    assert len(workers) == 2 and os.getpid() not in workers
    assert sum(done.values()) >= 5 and all(v > 0 for v in done.values()), done
    predicted = [r for r in catalog.read_table(config.store, "predictions").to_pylist() if r["model"] == "seg"]
    assert predicted and registry.current(config.store, "seg") is not None
    group = registry.group(config.store, "seg")
    assert len(group["members"]) == 2 and all(sorted(r["members"]) == sorted(group["members"]) for r in predicted)
    for version in group["members"]:
        info = json.loads((registry.version_dir(config.store, "seg", version) / "model.json").read_text())
        assert info["config"]["world_size"] == 2 and info["metrics"]["throughput"]["world_size"] == 2
