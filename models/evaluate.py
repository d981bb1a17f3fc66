"""Evaluation of networks over patches and whole stored volumes, scored with ``models.metrics``:

* segmentation: sliding-window prediction (MONAI) over each whole volume; Dice and 95 %
  Hausdorff distance (mm) per class against the stored label;
* classification: class probabilities of patches, or of whole volumes from their sliding
  windows (as inference computes them), and the operating threshold tuned on validation;
(autoencoders and GANs are scored on patches by their tasks, ``models.tasks``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from models import metrics
from models.networks import autocast
from voxelflow.data import map_labels
from voxelflow.store import open_label, open_volume


def keep_largest(pred: np.ndarray | torch.Tensor, classes) -> np.ndarray | torch.Tensor:
    """Keep only the largest connected component of each class in ``classes`` (organs that
    come in one piece); other voxels of those classes become background."""
    from scipy import ndimage

    if not classes:
        return pred
    is_tensor = isinstance(pred, torch.Tensor)
    arr = pred.numpy().copy() if is_tensor else pred.copy()
    for c in classes:
        comps, n = ndimage.label(arr == c)
        if n > 1:
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            arr[(comps != int(sizes.argmax())) & (comps > 0)] = 0
    return torch.from_numpy(arr) if is_tensor else arr


def sliding_logits(model, image: torch.Tensor, patch_size, device: torch.device, sw_batch_size: int = 2,
                   overlap: float = 0.25, predictor=None) -> torch.Tensor:
    """Logits of a whole ``(1, C, z, y, x)`` volume from Gaussian-weighted sliding windows
    (MONAI), under autocast on CUDA."""
    from monai.inferers import sliding_window_inference

    with autocast(device, True):
        return sliding_window_inference(image.to(device, non_blocking=True), roi_size=tuple(int(p) for p in patch_size),
                                        sw_batch_size=sw_batch_size, predictor=predictor or model, overlap=overlap,
                                        mode="gaussian")


@torch.no_grad()
def segmentation(model, store_root: str, volume_ids: list[str], patch_size, num_classes: int,
                 device: torch.device, label_name: str = "segmentation", largest: tuple[int, ...] = (),
                 hausdorff: bool = True, label_map: dict[int, int] | None = None) -> dict[str, Any]:
    """``dice_<k>`` and ``hd95_mm_<k>`` of each foreground class averaged over the volumes
    whose truth holds it, ``dice`` (their mean) and ``volumes``."""
    model.eval()
    per_class: dict[int, dict[str, list[float]]] = {k: {"dice": [], "hd95": []} for k in range(1, num_classes)}
    for vid in volume_ids:
        vol = open_volume(store_root, vid)
        image = torch.from_numpy(np.ascontiguousarray(vol.array[...], dtype=np.float32))[None, None]
        truth = torch.from_numpy(map_labels(open_label(store_root, vid, label_name)[...], label_map))
        pred = keep_largest(sliding_logits(model, image, patch_size, device).float().argmax(1)[0].cpu(), largest)
        dice = metrics.dice_per_class(pred, truth, num_classes)[0]
        spacing = [float(s) for s in np.sqrt((vol.affine[:3, :3] ** 2).sum(0))[::-1]]  # (z, y, x)
        for k in per_class:
            if math.isnan(float(dice[k - 1])):  # the truth lacks the class
                continue
            per_class[k]["dice"].append(float(dice[k - 1]))
            p, t = pred == k, truth == k
            if hausdorff and p.any():
                per_class[k]["hd95"].append(metrics.hd95(p, t, spacing))
    out = {}
    for k, m in per_class.items():
        out[f"dice_{k}"] = float(np.mean(m["dice"])) if m["dice"] else math.nan
        out[f"hd95_mm_{k}"] = float(np.mean(m["hd95"])) if m["hd95"] else math.nan
    out["dice"] = metrics.mean_dice(out)
    out["volumes"] = len(volume_ids)
    return out


@torch.no_grad()
def classification(model, batches: list[dict], num_classes: int, device: torch.device,
                   positive: int = 0) -> dict[str, Any]:
    """Metrics over patches (``batches`` of a patch dataset)."""
    model.eval()
    ys, probs = [], []
    for b in batches:
        keep = b["class"] >= 0
        if keep.any():
            with autocast(device, True):
                probs.append(torch.softmax(model(b["image"][keep].to(device)).float(), 1).cpu())
            ys.append(b["class"][keep])
    out = metrics.classification(torch.cat(ys), torch.cat(probs), num_classes, positive)
    out["samples"] = out.pop("n")
    return out


@torch.no_grad()
def window_probabilities(model, image: torch.Tensor, patch_size, device: torch.device, overlap: float = 0.5,
                         batch_size: int | None = None) -> np.ndarray:
    """Class probabilities of every sliding window over ``image`` ``(1, 1, z, y, x)``:
    ``(windows, classes)``. Windows are batched (default: about 2^18 voxels a batch, 4 windows of
    24x48x48, 64 slices of 64x64) and overlap by ``overlap`` along every axis longer than one
    voxel (a slice classifier's windows step one slice). MONAI's splitter pads the border ones."""
    from monai.inferers import SlidingWindowSplitter

    model.eval()
    patch_size = tuple(int(p) for p in patch_size)
    batch_size = batch_size or max(1, 2**18 // int(np.prod(patch_size)))
    splitter = SlidingWindowSplitter(patch_size=patch_size, overlap=tuple(overlap if p > 1 else 0.0 for p in patch_size),
                                     pad_mode="constant")
    out, pending = [], []

    def flush():
        with autocast(device, True):
            out.append(torch.softmax(model(torch.cat(pending).to(device)).float(), 1))
        pending.clear()

    for patch, _ in splitter(image):
        pending.append(patch)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return torch.cat(out).cpu().numpy()  # one copy to the host: no wait for the device per batch


def volume_probabilities(windows: np.ndarray, positive: int | None) -> np.ndarray:
    """A volume's class probabilities from its windows': the largest probability of the
    ``positive`` class (binary detection: one window showing it is enough), else the mean."""
    if positive is None:
        return windows.mean(0)
    p = float(windows[:, positive].max())
    out = np.empty(windows.shape[1])
    out[positive], out[1 - positive] = p, 1.0 - p
    return out


@torch.no_grad()
def volume_scores(model, store_root: str, volume_ids: list[str], patch_size, device: torch.device,
                  positive: int | None = None) -> np.ndarray:
    """Each volume's class probabilities ``(volumes, classes)`` from its sliding windows
    (:func:`volume_probabilities`), as inference computes them."""

    probs = []
    for vid in volume_ids:
        vol = open_volume(store_root, vid)
        image = torch.from_numpy(np.ascontiguousarray(vol.array[...], dtype=np.float32))[None, None]
        probs.append(volume_probabilities(window_probabilities(model, image, patch_size, device), positive))
    return np.stack(probs)


def classification_volumes(model, store_root: str, volume_ids: list[str], truths: list[int], num_classes: int,
                           patch_size, device: torch.device, positive: int | None = None,
                           threshold: float | None = None) -> dict[str, Any]:
    """Metrics over whole volumes (see :func:`volume_scores`); ``threshold``: the operating
    point on the positive class's probability (default: the most probable class)."""
    probs = volume_scores(model, store_root, volume_ids, patch_size, device, positive)
    out = metrics.classification(torch.tensor(truths), torch.from_numpy(probs).float(), num_classes,
                                 positive or 0, threshold=threshold)
    out["volumes"] = out.pop("n")
    out["_scores"] = probs
    return out


def operating_threshold(scores: np.ndarray, truths: np.ndarray) -> float | None:
    """The positive-probability threshold that maximises F1 on validation volumes: the
    midpoint between the scores it separates (the midpoint of the widest gap among ties).
    None without both classes (the argmax rule stays)."""
    scores, truths = np.asarray(scores, dtype=np.float64), np.asarray(truths, dtype=bool)
    if truths.all() or not truths.any():
        return None
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] / 2], (values[:-1] + values[1:]) / 2, [(values[-1] + 1) / 2]])
    best, best_key = None, None
    for i, t in enumerate(cuts):
        pred = scores >= t
        tp, fp, fn = int((pred & truths).sum()), int((pred & ~truths).sum()), int((~pred & truths).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        lo = values[i - 1] if i > 0 else 0.0
        hi = values[i] if i < len(values) else 1.0
        key = (round(f1, 9), hi - lo)
        if best_key is None or key > best_key:
            best, best_key = float(t), key
    return best
