"""The metric functions, one per name: validation, test evaluation and inference all call these,
so a metric name means one thing wherever it is reported. MONAI's implementations where it has
them (Dice, Hausdorff distance, ROC-AUC, PSNR, SSIM).

Names:

* ``dice_<k>``: Dice of class ``k`` (volumes without that class in the truth are left out);
  ``dice``: the mean over the foreground classes that were present;
* ``hd95_mm_<k>``: 95th-percentile Hausdorff distance of class ``k``, in millimetres;
* ``accuracy``; ``precision``, ``recall``, ``f1``: of the positive class (binary problems:
  the configured ``positive_class``, else class 0); ``macro_f1``: F1 averaged over classes;
  ``roc_auc``: of the positive class's probability; ``confusion``: truth x prediction counts;
* ``psnr``, ``ssim``: of reconstructions, the data range being each batch's intensity range;
* ``stat_distance``: |mean difference| + |std difference| of generated against real intensities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, *spatial)`` or ``(*spatial)`` class indices -> ``(B, classes, *spatial)``."""
    if labels.dim() <= 3:
        labels = labels[None, None]
    return torch.nn.functional.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1)


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of every foreground class, ``(B, classes - 1)``; NaN where the truth lacks the class
    (MONAI ``compute_dice``, ``ignore_empty``)."""
    from monai.metrics import compute_dice

    return compute_dice(one_hot(pred, num_classes), one_hot(truth, num_classes), include_background=False,
                        ignore_empty=True)


def hd95(pred: torch.Tensor, truth: torch.Tensor, spacing) -> float:
    """95th-percentile Hausdorff distance between two boolean masks, in the units of ``spacing``."""
    from monai.metrics import compute_hausdorff_distance

    return float(compute_hausdorff_distance(pred[None, None].float(), truth[None, None].float(), percentile=95,
                                            spacing=list(spacing)))


def mean_dice(values: dict[str, float]) -> float:
    """``dice``: the mean of the ``dice_<k>`` that are defined (NaN when none is)."""
    dices = [v for k, v in values.items() if k.startswith("dice_") and not math.isnan(v)]
    return float(np.mean(dices)) if dices else math.nan


def decide(probs: np.ndarray | torch.Tensor, positive: int | None, threshold: float | None):
    """Predicted class per row of ``probs``: the positive class when its probability reaches
    ``threshold`` (binary detection with a tuned operating point), else the most probable."""
    p = torch.as_tensor(probs)
    pred = p.argmax(-1)
    if positive is None or threshold is None:
        return pred
    return torch.where(p[..., positive] >= threshold, positive, 1 - positive)


def classification(y: torch.Tensor, p: torch.Tensor, num_classes: int, positive: int = 0,
                   threshold: float | None = None) -> dict[str, Any]:
    """Accuracy, precision / recall / F1 of class ``positive``, macro-F1, ROC-AUC, confusion
    matrix of class probabilities ``p`` against truths ``y``; predictions by :func:`decide`
    (``threshold`` applies to binary problems only)."""
    from monai.metrics import compute_roc_auc

    pred = decide(p, positive if num_classes == 2 else None, threshold)
    confusion = [[int(((y == t) & (pred == q)).sum()) for q in range(num_classes)] for t in range(num_classes)]

    def f1_of(k: int) -> tuple[float, float, float]:
        tp = confusion[k][k]
        fp = sum(confusion[t][k] for t in range(num_classes)) - tp
        fn = sum(confusion[k]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0

    precision, recall, f1 = f1_of(positive)
    onehot = torch.nn.functional.one_hot(y, num_classes).float()
    auc = float(compute_roc_auc(p[:, positive], onehot[:, positive])) if 0 < int(onehot[:, positive].sum()) < len(y) \
        else math.nan
    return {"accuracy": float((pred == y).float().mean()), "precision": precision, "recall": recall, "f1": f1,
            "macro_f1": float(np.mean([f1_of(k)[2] for k in range(num_classes)])),
            "roc_auc": auc, "confusion": confusion, "n": int(len(y))}


def reconstruction(recon: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM of a batch of 3-D reconstructions against their inputs (MONAI)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    rng = float(x.max() - x.min()) or 1.0
    return {"psnr": float(PSNRMetric(max_val=rng)(recon, x).mean()),
            "ssim": float(SSIMMetric(spatial_dims=3, data_range=rng, win_size=5)(recon, x).mean())}


def generation(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Intensity statistics of generated against real patches, and their ``stat_distance``."""
    real_mean, real_std, fake_mean, fake_std = (float(real.mean()), float(real.std()), float(fake.mean()),
                                                float(fake.std()))
    return {"stat_distance": abs(fake_mean - real_mean) + abs(fake_std - real_std), "real_mean": real_mean,
            "real_std": real_std, "fake_mean": fake_mean, "fake_std": fake_std}
