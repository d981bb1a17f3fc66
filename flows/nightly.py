"""The nightly flow: every stage as a subflow on one Dask cluster (see voxelflow/nightly.py)."""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.infer import infer_flow
from flows.ingest import ingest_flow
from flows.preprocess import preprocess_flow
from flows.train import train_flow
from tasks.retry import RETRY
from voxelflow.nightly import NightlyConfig, attach_labels
from voxelflow.runtime import dask_task_runner, local_cluster, local_gpus


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
    gpu = bool(local_gpus()) if config.gpu is None else config.gpu

    def record(stage: str, summary: dict, **shown: Any) -> None:
        stages.append({"stage": stage, "status": "completed", **{k: str(v) for k, v in shown.items()}})
        log.info("%s: %s", stage, {k: v for k, v in summary.items() if not isinstance(v, (list, dict))})

    try:
        with _cluster(dask_address, n_workers) as address:
            runner = dask_task_runner(address)
            ingest = ingest_flow.with_options(task_runner=runner)(config.ingest_config())
            record("ingest", ingest, detail=f"{ingest['volumes']} volumes, {ingest['files']} files "
                                           f"({ingest.get('failed', 0)} failed, {ingest.get('skipped', 0)} skipped)")
            labels = labels_flow(config)
            record("labels", labels, detail=f"{labels['segmentations']} segmentations, {labels['classes']} "
                                           f"classes, split {labels.get('split')}")
            pre = preprocess_flow.with_options(task_runner=runner)(config.preprocess_config())
            record("preprocess", pre, detail=f"version {pre['version']}: {pre['processed']} processed, "
                                             f"{pre['unchanged']} unchanged, {pre['failed']} failed")
            trained = {}
            for spec in config.models:
                out = train_flow.with_options(task_runner=runner)(config.train_run(spec, pre["version"]), gpu=gpu)
                trained[spec.name] = out
                record(f"train {spec.name}", out, detail=f"version {out['version']}, promoted {out['promoted']}, "
                                                         f"test {_brief(out['test'])}")
            if config.infer:
                for spec in config.models:
                    if spec.task not in ("segmentation", "classification"):
                        continue
                    out = infer_flow.with_options(task_runner=runner)(config.infer_config(spec), gpu=gpu)
                    record(f"infer {spec.name}", out, detail=f"{out['predicted']} predicted, "
                                                             f"{out['skipped']} already done")
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
    gpu = bool(local_gpus()) if config.gpu is None else config.gpu
    out = {}
    with _cluster(dask_address, None) as address:
        for spec in config.models:
            if spec.task in ("segmentation", "classification"):
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
