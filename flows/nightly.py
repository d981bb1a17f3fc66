"""The nightly flow: every stage as a subflow on one Dask cluster (see flows/nightly_config.py)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.infer import infer_flow
from flows.ingest import ingest_flow
from flows.nightly_config import NightlyConfig, attach_labels
from flows.preprocess import preprocess_flow
from flows.qc import qc_flow
from flows.runtime import dask_task_runner, local_cluster, use_gpu
from flows.train import train_flow
from tasks.retry import RETRY


@task(name="attach-labels", cache_policy=NO_CACHE, **RETRY)
def attach_labels_task(config: NightlyConfig) -> dict:
    return attach_labels(config)


@flow(name="labels", description="Attach segmentations and classes; give new patients a split")
def labels_flow(config: NightlyConfig) -> dict:
    out = attach_labels_task(config)
    log = get_run_logger()
    log.info("segmentations %d, classes %d, split %s", out["segmentations"], out["classes"], out.get("split"))
    for e in out["errors"]:
        log.warning("not attached: %s", e)
    return out


@contextlib.contextmanager
def _cluster(address: str | None, n_workers: int | None):
    """The scheduler every stage uses: ``address``, or a LocalCluster for the whole run."""
    import os

    address = address or os.environ.get("VOXELFLOW_DASK_ADDRESS")
    if address:
        yield address
        return
    n = n_workers or max(1, os.cpu_count() or 1)
    cluster = local_cluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


API_OUTAGE_S = 300.0  # how long a stage waits for an unreachable Prefect API to come back


def _api_healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _stage(name: str, call, *args: Any, attempts: int = 3, **kwargs: Any):
    """Run one stage subflow; if the Prefect API goes away meanwhile (a server restart), wait
    for it to answer again and run the stage again (every stage is safe to re-run: what it
    already wrote is kept and skipped). Prefect's own client retries a lost connection only
    on clients that had already connected; a subflow starting while the server is down fails
    at once. Reports clearly when the server does not come back."""
    import os

    import httpx
    from prefect.settings import PREFECT_API_URL

    from voxelflow.errors import ConfigurationError

    log = get_run_logger()
    for attempt in range(1, attempts + 1):
        try:
            return call(*args, **kwargs)
        except httpx.TransportError as exc:
            url = PREFECT_API_URL.value() or ""
            wait = float(os.environ.get("VOXELFLOW_API_OUTAGE_S", API_OUTAGE_S))
            log.warning("stage %s: the Prefect API at %s is unreachable (%s); waiting up to %.0f s for it",
                        name, url, exc, wait)
            deadline = time.monotonic() + wait
            while attempt == attempts or not _api_healthy(url):
                if time.monotonic() > deadline or attempt == attempts:
                    raise ConfigurationError(
                        f"stage {name}: the Prefect API at {url} stopped answering ({type(exc).__name__}: {exc}) "
                        f"and did not come back within {wait:.0f} s (attempt {attempt} of {attempts}). The stages "
                        f"before it completed and their output is kept; run the nightly pipeline again once "
                        f"the server is up.") from exc
                time.sleep(2)
            log.warning("stage %s: the Prefect API answers again; running the stage again (attempt %d)",
                        name, attempt + 1)
    raise AssertionError("unreachable")


def _load(config: NightlyConfig | None, config_file: str | None) -> NightlyConfig:
    if (config is None) == (config_file is None):
        raise ValueError("pass either config or config_file")
    return config if config is not None else NightlyConfig.from_file(config_file)


@flow(name="nightly", description="ingest -> labels -> preprocess -> train (promote if better) -> infer")
def nightly_flow(config: NightlyConfig | None = None, config_file: str | None = None,
                 dask_address: str | None = None, n_workers: int | None = None) -> dict:
    """Run every stage; a failed stage fails the run (what earlier stages wrote stays).
    ``config_file``: a JSON configuration (deployments from ``deployment/prefect.yaml``)."""
    config = _load(config, config_file)
    log = get_run_logger()
    stages: list[dict[str, Any]] = []
    gpu = use_gpu(config.gpu)

    def record(stage: str, summary: dict, **shown: Any) -> None:
        stages.append({"stage": stage, "status": "completed", **{k: str(v) for k, v in shown.items()}})
        log.info("%s: %s", stage, {k: v for k, v in summary.items() if not isinstance(v, (list, dict))})

    try:
        with _cluster(dask_address, n_workers) as address:
            runner = dask_task_runner(address)
            ingest = _stage("ingest", ingest_flow.with_options(task_runner=runner), config.ingest_config(), qc=False)
            record("ingest", ingest, detail=f"{ingest['volumes']} volumes, {ingest['files']} files "
                                           f"({ingest.get('failed', 0)} failed, {ingest.get('skipped', 0)} skipped)")
            labels = _stage("labels", labels_flow, config)
            record("labels", labels, detail=f"{labels['segmentations']} segmentations, {labels['classes']} "
                                           f"classes, split {labels.get('split')}")
            pre = _stage("preprocess", preprocess_flow.with_options(task_runner=runner), config.preprocess_config())
            record("preprocess", pre, detail=f"version {pre['version']}: {pre['processed']} processed, "
                                             f"{pre['unchanged']} unchanged, {pre['failed']} failed")
            trained = {}
            for spec in config.models:
                out = _stage(f"train {spec.name}", train_flow.with_options(task_runner=runner),
                             config.train_run(spec, pre["version"]), gpu=gpu)
                trained[spec.name] = out
                record(f"train {spec.name}", out, detail=f"version {out['version']}, promoted {out['promoted']}, "
                                                         f"test {_brief(out['test'])}")
            if config.infer:
                for spec in config.models:
                    if not spec.predicts():
                        continue
                    out = _stage(f"infer {spec.name}", infer_flow.with_options(task_runner=runner),
                                 config.infer_config(spec), gpu=gpu, qc=False)
                    record(f"infer {spec.name}", out, detail=f"{out['predicted']} predicted, "
                                                             f"{out['skipped']} already done")
            # the gallery once, with every model's predictions of tonight (a step of its own:
            # a report that cannot be written is a warning, not a failed night)
            report = _stage("qc", qc_flow.with_options(task_runner=runner), config.store)
            stages.append({"stage": "qc", "status": "completed" if report else "failed",
                           "detail": report or "not written (see the run's log)"})
    except BaseException as exc:
        stages.append({"stage": "failed", "status": type(exc).__name__, "detail": str(exc)[:500]})
        raise
    finally:
        create_table_artifact(key="nightly", table=stages, description="nightly run: stages")
    return {"stages": stages, "preprocessed": pre["version"],
            "models": {k: {"version": v["version"], "promoted": v["promoted"]} for k, v in trained.items()}}


@flow(name="ingest-from-config", description="The nightly configuration's ingest, on demand")
def ingest_from_config(config_file: str, dask_address: str | None = None) -> dict:
    config = NightlyConfig.from_file(config_file)
    with _cluster(dask_address, None) as address:
        return ingest_flow.with_options(task_runner=dask_task_runner(address))(config.ingest_config())


@flow(name="infer-from-config", description="Bulk inference with every configured model's current version")
def infer_from_config(config_file: str, dask_address: str | None = None) -> dict:
    config = NightlyConfig.from_file(config_file)
    gpu = use_gpu(config.gpu)
    out = {}
    with _cluster(dask_address, None) as address:
        for spec in config.models:
            if spec.predicts():
                out[spec.name] = infer_flow.with_options(task_runner=dask_task_runner(address))(
                    config.infer_config(spec), gpu=gpu)
    return out


def _brief(metrics: dict) -> str:
    keys = [k for k in ("dice", "dice_1", "f1", "accuracy", "psnr") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys)


def run_nightly(config: NightlyConfig, dask_address: str | None = None, n_workers: int | None = None,
                api_url: str | None = None) -> dict:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if api_url:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            return nightly_flow(config=config, dask_address=dask_address, n_workers=n_workers)
    return nightly_flow(config=config, dask_address=dask_address, n_workers=n_workers)
