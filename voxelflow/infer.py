"""Bulk inference: a registered model over stored volumes, results written back to the store.

* segmentation: MONAI sliding-window inference on the volume's preprocessed copy (the grid the
  model was trained on), the prediction mapped back onto the original volume's grid and stored
  as its OME-Zarr label ``prediction-<model>`` (provenance in the label's attributes); connected
  components of every foreground class become rows of ``catalog/lesions.parquet`` (size in mL,
  centroid and bounding box in world mm, maximum probability);
* classification: windows over the preprocessed volume, the volume's class probabilities
  (a class's maximum over windows for binary problems — a lesion seen anywhere counts) into
  ``catalog/predictions.parquet``.

A volume already predicted by the same model version is skipped.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from voxelflow import catalog, location, registry
from voxelflow.geometry import voxel_sizes
from voxelflow.labels import map_to_grid
from voxelflow.store import open_volume, write_label


class InferConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    store: str
    name: str  # registry name
    version: str | None = None  # default: the registry's current version
    split: str | None = None  # only volumes of this split
    volumes: list[str] | None = None
    overlap: float = 0.25
    sw_batch_size: int = 2
    min_voxels: int = 10  # smaller connected components are not reported as lesions
    # Grad-CAM maps (and QC images) for classifiers: of every volume, of the volumes predicted
    # as the model's positive class (a finding to look at; every volume when it has none), or none
    explain: Literal["all", "positive", "none"] = "positive"


def model_info(config: InferConfig) -> dict[str, Any]:
    version = config.version or (registry.current(config.store, config.name) or {}).get("version")
    if not version:
        raise FileNotFoundError(f"no model {config.name!r} in {config.store} (train one, or pass --model VERSION)")
    return json.loads((registry.version_dir(config.store, config.name, version) / "model.json").read_text())


def load_model(config: InferConfig, info: dict[str, Any], device: torch.device):
    from models.networks import from_config
    from models.train import TrainConfig

    train = TrainConfig(**info["config"]["train"])
    weights = location.torch_load(registry.version_dir(config.store, config.name, info["version"]) / "weights.pt",
                                  map_location=device, weights_only=True)
    out = _num_classes(weights["model"])
    model = from_config(train, out)
    model.load_state_dict(weights["model"])
    return model.to(device).eval(), train, out


def _num_classes(state: dict) -> int:
    """Output channels of a saved network: its last weight's first dimension."""
    last = [v for k, v in state.items() if k.endswith("weight")][-1]
    return int(last.shape[0])


def plan(config: InferConfig, info: dict[str, Any]) -> tuple[list[str], list[str]]:
    pre = info["config"]["version"]
    root = f"{config.store}/preprocessed/{pre}"
    candidates = [r["volume_id"] for r in catalog.read_table(root, "preprocessed").to_pylist() if r["status"] == "done"]
    if config.split:
        splits = {r["volume_id"]: r["split"] for r in catalog.read_table(config.store, "splits").to_pylist()}
        candidates = [v for v in candidates if splits.get(v) == config.split]
    if config.volumes is not None:
        candidates = [v for v in candidates if v in config.volumes]
    # done: predicted by this version from the volume as it is now (a re-ingested or
    # re-preprocessed volume with other content is predicted again)
    digests = {r["volume_id"]: r["digest"] for r in catalog.read_table(root, "preprocessed").to_pylist()}
    done = {r["volume_id"] for r in catalog.read_table(config.store, "predictions").to_pylist()
            if r["model"] == config.name and r["version"] == info["version"]
            and r.get("input_digest") == digests.get(r["volume_id"])}
    return [v for v in candidates if v not in done], [v for v in candidates if v in done]


def _load(config: InferConfig, info: dict[str, Any], volume_id: str):
    """Stage 1 (I/O): the volume's preprocessed copy as a ``(1, 1, z, y, x)`` float tensor."""
    pre = open_volume(f"{config.store}/preprocessed/{info['config']['version']}", volume_id)
    image = torch.from_numpy(np.ascontiguousarray(pre.array[...], dtype=np.float32))[None, None]
    return pre, image


@torch.no_grad()
def _predict(config: InferConfig, info: dict[str, Any], model, train, image: torch.Tensor,
             device: torch.device) -> np.ndarray:
    """Stage 2 (compute): segmentation class probabilities ``(classes, z, y, x)``, or the
    volume's class probabilities."""
    from models.networks import autocast

    image = image.to(device, non_blocking=True)
    if train.task == "segmentation":
        from monai.inferers import sliding_window_inference

        with autocast(device, True):
            logits = sliding_window_inference(image, roi_size=tuple(train.patch_size), sw_batch_size=config.sw_batch_size,
                                              predictor=model, overlap=config.overlap, mode="gaussian")
        return torch.softmax(logits.float(), 1)[0].cpu().numpy()
    if train.task == "classification":
        from models.evaluate import volume_probabilities, window_probabilities

        classes = _classes(config, info)
        positive = classes.index(train.positive_class) if train.positive_class in classes else None
        return volume_probabilities(window_probabilities(model, image, train.patch_size, device), positive)
    raise ValueError(f"inference is defined for segmentation and classification models, not {train.task}")


def _classes(config: InferConfig, info: dict[str, Any]) -> list[str]:
    return info["config"].get("classes") or \
        sorted({r["label"] for r in catalog.read_table(config.store, "classes").to_pylist()})


def _explain(config: InferConfig, info: dict[str, Any], model, train, volume_id: str, probs: np.ndarray,
             device: torch.device) -> str | None:
    """Grad-CAM of a classified volume and its QC image (in the thread that runs the model:
    Grad-CAM hooks the model's layers)."""
    if train.task != "classification" or config.explain == "none":
        return None
    predicted = _decision(config, info, train, probs)
    if config.explain == "positive" and train.positive_class is not None:
        classes = _classes(config, info)
        if train.positive_class in classes and predicted != classes.index(train.positive_class):
            return None
    from voxelflow.explain import explain_stored

    _, png = explain_stored(config.store, info["config"]["version"], f"{config.name}-{info['version']}",
                            model, train.patch_size, volume_id, predicted, device)
    return str(png)


def _decision(config: InferConfig, info: dict[str, Any], train, probs: np.ndarray) -> int:
    """The predicted class index: with a detection model's operating threshold (tuned on
    validation, recorded in the registry) the positive class when its probability reaches it,
    else the most probable class."""
    from models.evaluate import decide

    classes = _classes(config, info)
    positive = classes.index(train.positive_class) if train.positive_class in classes and len(probs) == 2 else None
    return int(decide(probs[None], positive, info["config"].get("threshold"))[0])


def _finish(config: InferConfig, info: dict[str, Any], train, num_classes: int, volume_id: str, pre,
            probs: np.ndarray, qc_image: str | None) -> tuple[dict, list[dict]]:
    """Stage 3 (post-processing and I/O): the prediction row and lesion rows; a segmentation is
    mapped back to the original grid and written into the volume's ``labels/``."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    row = {"volume_id": volume_id, "model": config.name, "version": info["version"], "task": train.task,
           "label_name": None, "classes": [], "probabilities": [], "prediction": None, "qc_image": None,
           "created_at": now, "input_digest": pre.attributes.get("digest")}
    lesions: list[dict] = []
    if train.task == "segmentation":
        from models.evaluate import keep_largest

        pred = keep_largest(probs.argmax(0).astype(np.uint8), train.keep_largest)
        original = open_volume(config.store, volume_id)
        mapped, mapping, warnings = map_to_grid(pred, pre.affine, tuple(original.array.shape[-3:]), original.affine,
                                                where=volume_id, min_coverage=0.0)
        name = f"prediction-{config.name}"
        write_label(config.store, volume_id, name, mapped, attributes={
            "model": config.name, "version": info["version"], "mapping": mapping, "warnings": warnings,
            "created_at": now.isoformat()})
        row |= {"label_name": name, "prediction": name,
                "classes": [str(k) for k in range(num_classes)],
                "probabilities": [float((pred == k).mean()) for k in range(num_classes)]}
        lesions = _components(pred, probs, pre.affine, volume_id, config.name, info["version"], config.min_voxels)
    else:
        classes = _classes(config, info)
        k = _decision(config, info, train, probs)
        row |= {"classes": classes[: len(probs)], "probabilities": [float(v) for v in probs],
                "prediction": classes[k] if classes else str(k),
                "qc_image": qc_image}
    return row, lesions


def infer_volume(config: InferConfig, info: dict[str, Any], model, train, num_classes: int, volume_id: str,
                 device: torch.device) -> tuple[dict, list[dict]]:
    """Predict one volume; write a segmentation back into the store. Returns the prediction row
    and its lesion rows."""
    pre, image = _load(config, info, volume_id)
    probs = _predict(config, info, model, train, image, device)
    qc = _explain(config, info, model, train, volume_id, probs, device)
    return _finish(config, info, train, num_classes, volume_id, pre, probs, qc)


def infer_volumes(config: InferConfig, info: dict[str, Any], model, train, num_classes: int,
                  volume_ids: list[str], device: torch.device,
                  pipeline: bool | None = None) -> tuple[list[dict], list[dict]]:
    """Predict volumes, in a pipeline when ``pipeline`` (default: on CUDA): while the model
    runs on volume ``i``, a reader thread loads volume ``i + 1`` and a writer thread
    post-processes and writes volume ``i - 1`` (Zarr decompression and numpy release the GIL).
    On CPU the model already keeps every core busy and the extra threads compete with it
    (bench/infer.py on 2 cores: 3.1-3.4 s either way, within run-to-run noise), so there the
    volumes go one at a time unless asked. Same results either way, in the same order; an
    error in any stage is raised."""
    from concurrent.futures import ThreadPoolExecutor

    rows: list[dict] = []
    lesions: list[dict] = []
    if not volume_ids:
        return rows, lesions
    if not (device.type == "cuda" if pipeline is None else pipeline):
        for vid in volume_ids:
            row, les = infer_volume(config, info, model, train, num_classes, vid, device)
            rows.append(row)
            lesions += les
        return rows, lesions
    with ThreadPoolExecutor(1, thread_name_prefix="infer-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="infer-write") as writer:
        loading = reader.submit(_load, config, info, volume_ids[0])
        writes = []
        for i, vid in enumerate(volume_ids):
            pre, image = loading.result()
            if i + 1 < len(volume_ids):
                loading = reader.submit(_load, config, info, volume_ids[i + 1])
            probs = _predict(config, info, model, train, image, device)
            qc = _explain(config, info, model, train, vid, probs, device)
            writes.append(writer.submit(_finish, config, info, train, num_classes, vid, pre, probs, qc))
            if len(writes) > 2:  # bounded memory: at most two volumes wait for the writer
                writes[-3].result()
        for w in writes:
            row, les = w.result()
            rows.append(row)
            lesions += les
    return rows, lesions


def _components(pred: np.ndarray, probs: np.ndarray, affine: np.ndarray, vid: str, model: str,
                version: str, min_voxels: int = 1) -> list[dict]:
    """Connected components of each foreground class with at least ``min_voxels`` voxels,
    measured together per class (scipy.ndimage's labelled statistics), never one Python step
    over voxels per component."""
    from scipy import ndimage

    voxel_ml = float(np.prod(voxel_sizes(affine))) / 1000.0
    rows = []
    for label in range(1, probs.shape[0]):
        comps, n = ndimage.label(pred == label)
        if n == 0:
            continue
        counts = np.bincount(comps.ravel())
        big = counts >= min_voxels
        big[0] = False
        if not big.any():
            continue
        if not big[1:].all():  # drop specks first: a noisy map can hold 10^5 of them
            comps, n = ndimage.label(big[comps])
        index = np.arange(1, n + 1)
        voxels = np.bincount(comps.ravel(), minlength=n + 1)[1:]
        centroids = np.asarray(ndimage.center_of_mass(np.ones(comps.shape, np.float32), comps, index),
                               dtype=np.float64)  # (n, z y x)
        inside = comps > 0
        peak = np.zeros(n + 1)
        np.maximum.at(peak, comps[inside], probs[label][inside])  # over component voxels only
        peak = peak[1:]
        boxes = ndimage.find_objects(comps)
        lo = np.array([[sl.start for sl in b] for b in boxes], dtype=np.float64)[:, ::-1]  # (n, x y z)
        hi = np.array([[sl.stop - 1 for sl in b] for b in boxes], dtype=np.float64)[:, ::-1]
        a, t = affine[:3, :3], affine[:3, 3]
        # world bounding box of each index box: per world axis, the extreme corner term by term
        terms_lo, terms_hi = lo[:, None, :] * a[None], hi[:, None, :] * a[None]  # (n, world, index)
        world_min = t + np.minimum(terms_lo, terms_hi).sum(-1)
        world_max = t + np.maximum(terms_lo, terms_hi).sum(-1)
        centres = centroids[:, ::-1] @ a.T + t
        for k in range(n):
            rows.append({"volume_id": vid, "model": model, "version": version, "label": label, "component": k + 1,
                         "voxels": int(voxels[k]), "volume_ml": float(voxels[k]) * voxel_ml,
                         "centroid_mm": centres[k].tolist(), "bbox_min_mm": world_min[k].tolist(),
                         "bbox_max_mm": world_max[k].tolist(), "max_probability": float(peak[k])})
    return rows


def write_catalog(store: str, rows: list[dict], lesions: list[dict]) -> None:
    catalog.upsert(store, "predictions", rows, catalog.PREDICTION_SCHEMA, ("volume_id", "model", "version"))
    if rows:
        done = {(r["volume_id"], r["model"], r["version"]) for r in rows}
        old = catalog.read_table(store, "lesions").to_pylist()
        keep = [r for r in old if (r["volume_id"], r["model"], r["version"]) not in done]
        import pyarrow as pa

        catalog.write_table(store, "lesions", pa.Table.from_pylist(keep + lesions, schema=catalog.LESION_SCHEMA))


def run_local(config: InferConfig) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = model_info(config)
    todo, done = plan(config, info)
    model, train, n = load_model(config, info, device)
    rows, lesions = infer_volumes(config, info, model, train, n, todo, device)
    write_catalog(config.store, rows, lesions)
    return {"model": config.name, "version": info["version"], "predicted": len(rows), "skipped": len(done),
            "lesions": len(lesions)}
