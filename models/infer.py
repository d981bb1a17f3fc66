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
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from models.evaluate import decide, keep_largest, volume_probabilities, window_probabilities
from models.explain import explain_stored
from models.networks import autocast, from_config, tuned_kernels
from models.train import TrainConfig
from voxelflow import catalog, location, registry
from voxelflow.geometry import voxel_sizes
from voxelflow.labels import grid_mapping, resample_nearest
from voxelflow.store import open_volume, write_label
from voxelflow.errors import NotInStoreError, SettingError


class InferConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    store: str
    name: str  # registry name
    version: str | None = None  # default: the registry's current version
    split: str | None = None  # only volumes of this split
    volumes: list[str] | None = None
    overlap: float = 0.25
    # sliding windows per model call; default: 2 on a CPU, 16 on a GPU (a 1 M-parameter U-Net
    # on two 32x64x64 windows leaves an H100 waiting on kernel launches)
    sw_batch_size: int | None = None
    min_voxels: int = 10  # smaller connected components are not reported as lesions
    # Grad-CAM maps (and QC images) for classifiers: of every volume, of the volumes predicted
    # as the model's positive class (a finding to look at; every volume when it has none), or none
    explain: Literal["all", "positive", "none"] = "positive"


def model_info(config: InferConfig) -> dict[str, Any]:
    version = config.version or (registry.current(config.store, config.name) or {}).get("version")
    if not version:
        raise NotInStoreError(f"no model {config.name!r} in {config.store} (train one, or pass --model VERSION)")
    return json.loads((registry.version_dir(config.store, config.name, version) / "model.json").read_text())


def load_model(config: InferConfig, info: dict[str, Any], device: torch.device):

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


def _load(config: InferConfig, info: dict[str, Any], volume_id: str):
    """Stage 1 (I/O): the volume's preprocessed copy as a ``(1, 1, z, y, x)`` float tensor."""
    pre = open_volume(f"{config.store}/preprocessed/{info['config']['version']}", volume_id)
    image = torch.from_numpy(np.ascontiguousarray(pre.array[...], dtype=np.float32))[None, None]
    return pre, image


@dataclass
class _Target:
    """The original volume's grid, where a segmentation is stored: its shape and the map from
    its array index to the preprocessed grid's (None: the same grid)."""

    shape: tuple[int, int, int]
    m_zyx: np.ndarray | None
    mapping: str
    warnings: list[str]


def _read_target(config: InferConfig, volume_id: str, pre, grid_shape: tuple[int, ...]) -> _Target:
    original = open_volume(config.store, volume_id)
    shape = tuple(int(n) for n in original.array.shape[-3:])
    m_zyx, mapping, warnings = grid_mapping(tuple(grid_shape), pre.affine, shape, original.affine,
                                            where=volume_id, min_coverage=0.0)
    return _Target(shape, m_zyx, mapping, warnings)


def _read(config: InferConfig, info: dict[str, Any], train, volume_id: str):
    """Stage 1 (I/O): :func:`_load`, and for a segmentation model the original grid it maps back to."""
    pre, image = _load(config, info, volume_id)
    target = _read_target(config, volume_id, pre, image.shape[-3:]) if train.task == "segmentation" else None
    return pre, image, target


def _compute(config: InferConfig, info: dict[str, Any], model, train, volume_id: str, image: torch.Tensor,
             target: _Target | None, device: torch.device):
    """Stage 2 (the model's thread): the prediction, and a classifier's Grad-CAM."""
    if train.task == "segmentation":
        return _segment(config, model, train, image, device, target), None
    probs = _predict(config, info, model, train, image, device)
    return probs, _explain(config, info, model, train, volume_id, probs, device)


def _sw_batch(config: InferConfig, device: torch.device) -> int:
    return config.sw_batch_size or (16 if device.type == "cuda" else 2)


def _segmentation_logits(config: InferConfig, model, train, image: torch.Tensor, device: torch.device):
    from monai.inferers import sliding_window_inference


    batch = _sw_batch(config, device)
    predictor = _fixed_batch(model, batch) if device.type == "cuda" else model
    with autocast(device, True):
        return sliding_window_inference(image.to(device, non_blocking=True), roi_size=tuple(train.patch_size),
                                        sw_batch_size=batch, predictor=predictor,
                                        overlap=config.overlap, mode="gaussian")


def _fixed_batch(model, size: int):
    """``model`` on batches padded (with zero windows) to ``size``: a volume's last, partial
    batch of windows has the shape of the others, so cuDNN's autotuner times one shape per
    window size, not one per leftover count of every volume size (each new shape costs a
    round of timing every convolution). Windows are independent in eval mode (instance
    norm), so the padding changes no output."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        if k >= size:
            return model(x)
        return model(torch.cat([x, x.new_zeros((size - k, *x.shape[1:]))]))[:k]
    return predict


@torch.no_grad()
def _predict(config: InferConfig, info: dict[str, Any], model, train, image: torch.Tensor,
             device: torch.device) -> np.ndarray:
    """Stage 2 (compute): segmentation class probabilities ``(classes, z, y, x)``, or the
    volume's class probabilities."""
    image = image.to(device, non_blocking=True)
    if train.task == "segmentation":
        logits = _segmentation_logits(config, model, train, image, device)
        return torch.softmax(logits.float(), 1)[0].cpu().numpy()
    if train.task == "classification":

        classes = _classes(config, info)
        positive = classes.index(train.positive_class) if train.positive_class in classes else None
        return volume_probabilities(window_probabilities(model, image, train.patch_size, device), positive)
    raise SettingError(f"inference is defined for segmentation and classification models, not {train.task}")


@dataclass
class _Segmented:
    """A segmentation model's output for one volume: class probabilities ``(classes, z, y, x)``
    and labels on the model's grid; the labels on the original grid unless ``keep_largest``
    post-processing (scipy, on the host) comes first."""

    probs: np.ndarray
    pred: np.ndarray
    mapped: np.ndarray | None


@torch.no_grad()
def _segment(config: InferConfig, model, train, image: torch.Tensor, device: torch.device,
             target: _Target) -> _Segmented:
    """Stage 2 for segmentation: the sliding window, then softmax, argmax and the mapping back
    onto the original grid on the inference device (on a GPU: milliseconds, where the host's
    argmax and scipy's resampling took most of a volume's time); one copy of each to the host."""
    probs = torch.softmax(_segmentation_logits(config, model, train, image, device).float(), 1)[0]
    if device.type == "cpu":  # numpy's argmax over the class axis is several times torch's on a CPU
        pred = torch.from_numpy(probs.numpy().argmax(0).astype(np.uint8))
    else:
        pred = probs.argmax(0).to(torch.uint8)
    mapped = None
    if not train.keep_largest:
        mapped = pred if target.m_zyx is None else resample_nearest(pred, target.m_zyx, target.shape)
        mapped = mapped.cpu().numpy()
    return _Segmented(probs.cpu().numpy(), pred.cpu().numpy(), mapped)


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

    _, png = explain_stored(config.store, info["config"]["version"], f"{config.name}-{info['version']}",
                            model, train.patch_size, volume_id, predicted, device)
    return str(png)


def _decision(config: InferConfig, info: dict[str, Any], train, probs: np.ndarray) -> int:
    """The predicted class index: with a detection model's operating threshold (tuned on
    validation, recorded in the registry) the positive class when its probability reaches it,
    else the most probable class."""

    classes = _classes(config, info)
    positive = classes.index(train.positive_class) if train.positive_class in classes and len(probs) == 2 else None
    return int(decide(probs[None], positive, info["config"].get("threshold"))[0])


def _finish(config: InferConfig, info: dict[str, Any], train, num_classes: int, volume_id: str, pre,
            probs: np.ndarray | _Segmented, qc_image: str | None,
            target: _Target | None = None) -> tuple[dict, list[dict]]:
    """Stage 3 (post-processing and I/O): the prediction row and lesion rows; a segmentation is
    mapped back to the original grid (unless :func:`_segment` did) and written into the
    volume's ``labels/``."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    row = {"volume_id": volume_id, "model": config.name, "version": info["version"], "task": train.task,
           "label_name": None, "classes": [], "probabilities": [], "prediction": None, "qc_image": None,
           "created_at": now, "input_digest": pre.attributes.get("digest")}
    lesions: list[dict] = []
    if train.task == "segmentation":

        seg = probs if isinstance(probs, _Segmented) else _Segmented(probs, probs.argmax(0).astype(np.uint8), None)
        probs = seg.probs
        if target is None:
            target = _read_target(config, volume_id, pre, seg.pred.shape)
        pred, mapped = seg.pred, seg.mapped
        if mapped is None:  # keep_largest (on the host), then the mapping
            pred = keep_largest(pred, train.keep_largest)
            mapped = pred if target.m_zyx is None else \
                resample_nearest(torch.from_numpy(pred), target.m_zyx, target.shape).numpy()
        name = f"prediction-{config.name}"
        write_label(config.store, volume_id, name, mapped, attributes={
            "model": config.name, "version": info["version"], "mapping": target.mapping,
            "warnings": target.warnings, "created_at": now.isoformat()})
        counts = np.bincount(pred.ravel(), minlength=num_classes)
        row |= {"label_name": name, "prediction": name,
                "classes": [str(k) for k in range(num_classes)],
                "probabilities": [float(counts[k] / pred.size) for k in range(num_classes)]}
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

    with tuned_kernels(device):
        pre, image, target = _read(config, info, train, volume_id)
        out, qc = _compute(config, info, model, train, volume_id, image, target, device)
        return _finish(config, info, train, num_classes, volume_id, pre, out, qc, target)


def infer_volumes(config: InferConfig, info: dict[str, Any], model, train, num_classes: int,
                  volume_ids: list[str], device: torch.device,
                  pipeline: bool | None = None) -> tuple[list[dict], list[dict]]:
    """Predict volumes, in a pipeline when ``pipeline`` (default: on CUDA): while the model
    runs on volume ``i``, a reader thread loads the next volumes and writer threads
    post-process and write the previous ones (Zarr decompression, compression and numpy
    release the GIL; the volumes' labels go to distinct folders). On CPU the model already
    keeps every core busy and the extra threads compete with it (bench/infer.py on 2 cores:
    3.1-3.4 s either way, within run-to-run noise), so there the volumes go one at a time
    unless asked. Same results either way, in the same order; an error in any stage is raised.
    On CUDA cuDNN autotunes the convolutions (``networks.tuned_kernels``)."""

    with tuned_kernels(device):
        return _infer_volumes(config, info, model, train, num_classes, volume_ids, device, pipeline)


def _infer_volumes(config: InferConfig, info: dict[str, Any], model, train, num_classes: int,
                   volume_ids: list[str], device: torch.device,
                   pipeline: bool | None) -> tuple[list[dict], list[dict]]:
    import os
    from concurrent.futures import ThreadPoolExecutor

    rows: list[dict] = []
    lesions: list[dict] = []
    if not volume_ids:
        return rows, lesions
    if not (device.type == "cuda" if pipeline is None else pipeline):
        for vid in volume_ids:
            pre, image, target = _read(config, info, train, vid)
            out, qc = _compute(config, info, model, train, vid, image, target, device)
            row, les = _finish(config, info, train, num_classes, vid, pre, out, qc, target)
            rows.append(row)
            lesions += les
        return rows, lesions
    writers = max(1, min(4, (os.cpu_count() or 2) // 2))
    ahead = 2  # volumes read ahead of the model
    with ThreadPoolExecutor(1, thread_name_prefix="infer-read") as reader, \
            ThreadPoolExecutor(writers, thread_name_prefix="infer-write") as writer:
        loading = [reader.submit(_read, config, info, train, v) for v in volume_ids[:ahead]]
        writes = []
        for i, vid in enumerate(volume_ids):
            pre, image, target = loading[i].result()
            loading[i] = None  # the reader's result is the model's now
            if i + ahead < len(volume_ids):
                loading.append(reader.submit(_read, config, info, train, volume_ids[i + ahead]))
            out, qc = _compute(config, info, model, train, vid, image, target, device)
            writes.append(writer.submit(_finish, config, info, train, num_classes, vid, pre, out, qc, target))
            if len(writes) > 2 * writers:  # bounded memory: at most 2 volumes per writer wait
                writes[-2 * writers - 1].result()
        for w in writes:
            row, les = w.result()
            rows.append(row)
            lesions += les
    return rows, lesions


def _components(pred: np.ndarray, probs: np.ndarray, affine: np.ndarray, vid: str, model: str,
                version: str, min_voxels: int = 1) -> list[dict]:
    """Connected components of each foreground class with at least ``min_voxels`` voxels,
    measured together per class, never one Python step over voxels per component: one
    ``ndimage.label`` per class, then counts, centroids and peak probabilities as bincounts
    and a scatter over the component voxels only (the same sums, in the same order, as
    scipy.ndimage's labelled statistics, at a fraction of their passes over the volume)."""
    from scipy import ndimage

    voxel_ml = float(np.prod(voxel_sizes(affine))) / 1000.0
    rows = []
    for label in range(1, probs.shape[0]):
        comps, n = ndimage.label(pred == label)
        if n == 0:
            continue
        where = np.flatnonzero(comps)  # the component voxels, in raster order
        ids = comps.ravel()[where]
        counts = np.bincount(ids, minlength=n + 1)
        big = counts >= min_voxels
        big[0] = False
        if not big.any():
            continue
        if not big[1:].all():  # drop specks first: a noisy map can hold 10^5 of them
            # the kept components renumbered 1..n in their order (raster order of their first
            # voxels), which is how labelling the kept voxels again would number them
            renumber = (np.cumsum(big) * big).astype(comps.dtype)
            keep = big[ids]
            where, ids = where[keep], renumber[ids[keep]]
            comps = renumber[comps]
            n = int(big.sum())
        voxels = np.bincount(ids, minlength=n + 1)
        coords = np.unravel_index(where, comps.shape)
        centroids = np.stack([np.bincount(ids, weights=c.astype(np.float64), minlength=n + 1)[1:] / voxels[1:]
                              for c in coords], axis=1)  # (n, z y x)
        voxels = voxels[1:]
        values = torch.from_numpy(probs[label].ravel()[where].astype(np.float64))
        peak = torch.zeros(n + 1, dtype=torch.float64).scatter_reduce_(
            0, torch.from_numpy(ids.astype(np.int64)), values, reduce="amax").numpy()[1:]
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
