"""Final evaluation on the test split, per task.

* segmentation: sliding-window prediction (MONAI) over each whole test volume; Dice and 95 %
  Hausdorff distance (mm) per class against the stored label;
* classification: test patches; accuracy, precision, recall, F1, ROC-AUC, confusion matrix;
* autoencoder: PSNR and SSIM of reconstructions of test patches;
* GAN: intensity statistics of generated against real patches, and a sample grid image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

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


@torch.no_grad()
def segmentation(model, store_root: str, volume_ids: list[str], patch_size, num_classes: int,
                 device: torch.device, label_name: str = "segmentation", largest: tuple[int, ...] = (),
                 hausdorff: bool = True, label_map: dict[int, int] | None = None) -> dict[str, Any]:
    from monai.inferers import sliding_window_inference
    from monai.metrics import compute_hausdorff_distance


    model.eval()
    per_class: dict[int, dict[str, list[float]]] = {k: {"dice": [], "hd95": []} for k in range(1, num_classes)}
    for vid in volume_ids:
        vol = open_volume(store_root, vid)
        image = torch.from_numpy(np.ascontiguousarray(vol.array[...], dtype=np.float32))[None, None].to(device)
        truth = torch.from_numpy(map_labels(open_label(store_root, vid, label_name)[...], label_map))
        with autocast(device, True):
            logits = sliding_window_inference(image, roi_size=tuple(patch_size), sw_batch_size=2,
                                              predictor=model, overlap=0.25, mode="gaussian")
        pred = keep_largest(logits.float().argmax(1)[0].cpu(), largest)
        spacing = [float(s) for s in np.sqrt((vol.affine[:3, :3] ** 2).sum(0))[::-1]]  # (z, y, x)
        for k in per_class:
            p, t = pred == k, truth == k
            if t.sum() == 0:
                continue
            inter = float((p & t).sum())
            per_class[k]["dice"].append(2 * inter / float(p.sum() + t.sum()))
            if hausdorff and p.any():
                hd = compute_hausdorff_distance(p[None, None].float(), t[None, None].float(), percentile=95,
                                                spacing=spacing)
                per_class[k]["hd95"].append(float(hd))
    out = {}
    for k, m in per_class.items():
        out[f"dice_{k}"] = float(np.mean(m["dice"])) if m["dice"] else math.nan
        out[f"hd95_mm_{k}"] = float(np.mean(m["hd95"])) if m["hd95"] else math.nan
    dices = [v for k, v in out.items() if k.startswith("dice_") and not math.isnan(v)]
    out["dice"] = float(np.mean(dices)) if dices else math.nan
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
    out = classification_metrics(torch.cat(ys), torch.cat(probs), num_classes, positive)
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
    out = classification_metrics(torch.tensor(truths), torch.from_numpy(probs).float(), num_classes,
                                 positive or 0, threshold=threshold)
    out["volumes"] = out.pop("n")
    out["_scores"] = probs
    return out


def decide(probs: np.ndarray | torch.Tensor, positive: int | None, threshold: float | None):
    """Predicted class per row of ``probs``: the positive class when its probability reaches
    ``threshold`` (binary detection with a tuned operating point), else the most probable."""
    p = torch.as_tensor(probs)
    pred = p.argmax(-1)
    if positive is None or threshold is None:
        return pred
    return torch.where(p[..., positive] >= threshold, positive, 1 - positive)


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


def classification_metrics(y: torch.Tensor, p: torch.Tensor, num_classes: int, positive: int = 0,
                           threshold: float | None = None) -> dict[str, Any]:
    """Accuracy, precision / recall / F1 of class ``positive``, ROC-AUC, confusion matrix;
    predictions by :func:`decide` (``threshold`` applies to binary problems only)."""
    from monai.metrics import compute_roc_auc

    pred = decide(p, positive if num_classes == 2 else None, threshold)
    confusion = [[int(((y == t) & (pred == q)).sum()) for q in range(num_classes)] for t in range(num_classes)]
    tp = confusion[positive][positive]
    fp = sum(confusion[t][positive] for t in range(num_classes)) - tp
    fn = sum(confusion[positive]) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    onehot = torch.nn.functional.one_hot(y, num_classes).float()
    auc = float(compute_roc_auc(p[:, positive], onehot[:, positive])) if 0 < int(onehot[:, positive].sum()) < len(y) \
        else math.nan
    return {"accuracy": float((pred == y).float().mean()), "precision": precision, "recall": recall, "f1": f1,
            "roc_auc": auc, "confusion": confusion, "n": int(len(y))}


@torch.no_grad()
def autoencoder(model, batches: list[dict], device: torch.device) -> dict[str, Any]:
    from monai.metrics import PSNRMetric, SSIMMetric

    model.eval()
    psnr, ssim = [], []
    for b in batches:
        x = b["image"].to(device)
        with autocast(device, True):
            r = model(x).float()
        rng = float(x.max() - x.min()) or 1.0
        psnr.append(float(PSNRMetric(max_val=rng)(r, x).mean()))
        ssim.append(float(SSIMMetric(spatial_dims=3, data_range=rng, win_size=5)(r, x).mean()))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "samples": len(batches)}


@torch.no_grad()
def gan(generator, batches: list[dict], latent_size: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    generator.eval()
    real = torch.cat([b["image"] for b in batches])
    z = torch.randn(real.shape[0], latent_size, generator=torch.Generator().manual_seed(seed)).to(device)
    with autocast(device, True):
        fake = generator(z).float().cpu()
    return {"real_mean": float(real.mean()), "real_std": float(real.std()), "fake_mean": float(fake.mean()),
            "fake_std": float(fake.std()), "samples": int(real.shape[0]), "_fake": fake}


def sample_grid(volumes: torch.Tensor, columns: int = 4) -> np.ndarray:
    """Middle slices of ``(N, 1, z, y, x)`` volumes tiled into a uint8 image."""
    slices = [v[0, v.shape[1] // 2].numpy() for v in volumes[: columns * 2]]
    lo, hi = min(float(s.min()) for s in slices), max(float(s.max()) for s in slices)
    tiles = [np.clip((s - lo) / ((hi - lo) or 1.0), 0, 1) for s in slices]
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
