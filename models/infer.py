"""Bulk inference: a registered model over stored volumes, results written back to the store.

Which volumes (``plan``: those not yet predicted by this model version from their current
content), the model loaded once, and its task's predictor (``models.predict.Predictor``) run
over the volumes, pipelined on a GPU; the rows go to ``catalog/predictions.parquet`` and the
lesions to ``catalog/lesions.parquet``. What a prediction is (a label map on the original grid,
class probabilities with a Grad-CAM map) is the task's: ``models.tasks``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import torch

from models.config import TrainConfig
from models.networks import tuned_kernels
from models.predict import InferConfig, Predictor
from models.tasks import task_for
from voxelflow import catalog, location, registry
from voxelflow.errors import NotInStoreError

__all__ = ["InferConfig", "Predictor", "model_info", "load_predictor", "plan", "infer_volume", "infer_volumes",
           "write_catalog", "run_local"]


def model_info(config: InferConfig) -> dict[str, Any]:
    """The registry entry of the model ``config`` predicts with: a version (default: the
    current one) or, with ``ensemble``, a cross-validated run's folds (``models.ensemble``)."""
    if config.ensemble:
        from models.ensemble import ensemble_info

        return ensemble_info(config.store, config.name, None if config.ensemble == "latest" else config.ensemble)
    version = config.version or (registry.current(config.store, config.name) or {}).get("version")
    if not version:
        raise NotInStoreError(f"no model {config.name!r} in {config.store} (train one, or pass --model VERSION)")
    return json.loads((registry.version_dir(config.store, config.name, version) / "model.json").read_text())


def load_predictor(config: InferConfig, info: dict[str, Any], device: torch.device) -> Predictor:
    """The registered model (or ensemble) on ``device`` in eval mode, wrapped in its task's
    predictor."""
    train = TrainConfig(**info["config"]["train"])
    members = []
    for version in info.get("members") or [info["version"]]:
        weights = location.torch_load(registry.version_dir(config.store, config.name, version) / "weights.pt",
                                      map_location=device, weights_only=True)
        task = task_for(train, _num_classes(weights["model"]))
        members.append(task.deployed(weights).to(device).eval())
    if "members" in info:
        from models.ensemble import MeanProbabilities

        model = MeanProbabilities(members).to(device).eval()
    else:
        model = members[0]
    return task.predictor(config, info, model, device)


def _num_classes(state: dict) -> int:
    """Output channels of a saved network: its last weight's first dimension."""
    last = [v for k, v in state.items() if k.endswith("weight")][-1]
    return int(last.shape[0])


def plan(config: InferConfig, info: dict[str, Any]) -> tuple[list[str], list[str]]:
    pre = info["config"]["version"]
    root = f"{config.store}/preprocessed/{pre}"
    candidates = [r["volume_id"] for r in catalog.preprocessed_volumes(config.store, pre, config.split or None)]
    if config.volumes is not None:
        candidates = [v for v in candidates if v in config.volumes]
    # done: predicted by this version from the volume as it is now (a re-ingested or
    # re-preprocessed volume with other content is predicted again)
    digests = {r["volume_id"]: r["digest"] for r in catalog.read_table(root, "preprocessed").to_pylist()}
    done = {r["volume_id"] for r in catalog.read_table(config.store, "predictions").to_pylist()
            if r["model"] == config.name and r["version"] == info["version"]
            and r.get("input_digest") == digests.get(r["volume_id"])}
    return [v for v in candidates if v not in done], [v for v in candidates if v in done]


def infer_volume(predictor: Predictor, volume_id: str) -> tuple[dict, list[dict]]:
    """Predict one volume; write a segmentation back into the store. Returns the prediction row
    and its lesion rows."""
    with tuned_kernels(predictor.device):
        return predictor.predict(volume_id)


def infer_volumes(predictor: Predictor, volume_ids: list[str],
                  pipeline: bool | None = None) -> tuple[list[dict], list[dict]]:
    """Predict volumes, in a pipeline when ``pipeline`` (default: on CUDA): while the model
    runs on volume ``i``, a reader thread loads the next volumes and writer threads
    post-process and write the previous ones (Zarr decompression, compression and numpy
    release the GIL; the volumes' labels go to distinct folders). On CPU the model already
    keeps every core busy and the extra threads compete with it (bench/infer.py on 2 cores:
    3.1-3.4 s either way, within run-to-run noise), so there the volumes go one at a time
    unless asked. Same results either way, in the same order; an error in any stage is raised.
    On CUDA cuDNN autotunes the convolutions (``networks.tuned_kernels``)."""

    with tuned_kernels(predictor.device):
        return _infer_volumes(predictor, volume_ids, pipeline)


def _infer_volumes(predictor: Predictor, volume_ids: list[str],
                   pipeline: bool | None) -> tuple[list[dict], list[dict]]:
    rows: list[dict] = []
    lesions: list[dict] = []
    if not volume_ids:
        return rows, lesions
    if not (predictor.device.type == "cuda" if pipeline is None else pipeline):
        for vid in volume_ids:
            row, les = predictor.predict(vid)
            rows.append(row)
            lesions += les
        return rows, lesions
    writers = max(1, min(4, (os.cpu_count() or 2) // 2))
    ahead = 2  # volumes read ahead of the model
    with ThreadPoolExecutor(1, thread_name_prefix="infer-read") as reader, \
            ThreadPoolExecutor(writers, thread_name_prefix="infer-write") as writer:
        loading = [reader.submit(predictor.read, v) for v in volume_ids[:ahead]]
        writes = []
        for i, vid in enumerate(volume_ids):
            loaded = loading[i].result()
            loading[i] = None  # the reader's result is the model's now
            if i + ahead < len(volume_ids):
                loading.append(reader.submit(predictor.read, volume_ids[i + ahead]))
            computed = predictor.compute(vid, loaded)
            writes.append(writer.submit(predictor.finish, vid, loaded, computed))
            if len(writes) > 2 * writers:  # bounded memory: at most 2 volumes per writer wait
                writes[-2 * writers - 1].result()
        for w in writes:
            row, les = w.result()
            rows.append(row)
            lesions += les
    return rows, lesions


def write_catalog(store: str, rows: list[dict], lesions: list[dict]) -> None:
    catalog.upsert(store, "predictions", rows, catalog.PREDICTION_SCHEMA, ("volume_id", "model", "version"))
    if rows:
        done = {(r["volume_id"], r["model"], r["version"]) for r in rows}
        old = catalog.read_table(store, "lesions").to_pylist()
        keep = [r for r in old if (r["volume_id"], r["model"], r["version"]) not in done]
        catalog.write_table(store, "lesions", pa.Table.from_pylist(keep + lesions, schema=catalog.LESION_SCHEMA))


def run_local(config: InferConfig) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = model_info(config)
    todo, done = plan(config, info)
    rows, lesions = infer_volumes(load_predictor(config, info, device), todo)
    write_catalog(config.store, rows, lesions)
    return {"model": config.name, "version": info["version"], "predicted": len(rows), "skipped": len(done),
            "lesions": len(lesions), **({"members": info["members"]} if "members" in info else {})}
