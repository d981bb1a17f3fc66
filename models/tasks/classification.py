"""Classification: a narrow ResNet-10 (MONAI ``resnet10``), 3-D or, on patches one voxel deep,
2-D (``Planar``), trained with class-weighted cross-entropy on class-balanced patches; volumes
are classified from their sliding windows (binary detection: the positive class's largest
window probability), validated by ROC-AUC (detection) or macro-F1, with the operating
threshold tuned on the validation volumes; inference writes class probabilities and, for
volumes worth a look, Grad-CAM maps with a QC image."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models import evaluate, metrics
from models.explain import explain_stored
from models.networks import Planar, autocast, is_planar
from models.predict import Predictor
from models.tasks.base import Nets, RunData, Task, Update
from voxelflow import catalog
from voxelflow.errors import SettingError

if TYPE_CHECKING:
    from models.config import TrainConfig


class Classification(Task):
    name = "classification"
    monitor = "macro_f1"  # detection (a positive class): "roc_auc", see ``monitor_key``
    uses_label = True  # foreground sampling; patch targets from the label with ``positive_label``
    default_weighting = "inverse"
    predicts = True

    @classmethod
    def check(cls, config: TrainConfig) -> None:
        cls.refuse_label_map(config)  # patches one voxel deep make a slice classifier

    def monitor_key(self) -> str:
        return "roc_auc" if self.config.positive_class is not None else self.monitor

    def networks(self) -> Nets:
        from monai.networks.nets import resnet10

        n, planar = self.config.network, is_planar(self.config.sampling.patch_size)
        # a quarter of ResNet-10's width: 0.9 M parameters, enough for CT volumes and fast on
        # CPU; a 3-voxel stem without max-pool, and without stride unless ``stem_stride`` asks
        # for one: MONAI's 7-voxel stride-2 stem and pool blur away lesions a few voxels across
        # before the first residual block sees them. A stride of 2 halves every axis before the
        # residual blocks (8x fewer voxels in 3-D), and a lesion 4 voxels across is still 2
        # voxels across where the first block sees it (its speed-up: README).
        net = resnet10(spatial_dims=2 if planar else 3, n_input_channels=1, num_classes=self.num_classes,
                       feed_forward=True, widen_factor=0.25, conv1_t_size=3, conv1_t_stride=int(n.stem_stride),
                       no_max_pool=True, norm=("instance", {"affine": True}) if n.norm == "instance" else n.norm)
        # max pooling suits detection (is a small finding anywhere in the patch?): an average
        # over the patch dilutes a lesion of a hundred voxels among fifty thousand
        if n.pooling == "max":
            net.avgpool = (nn.AdaptiveMaxPool2d if planar else nn.AdaptiveMaxPool3d)(1)
        return {"model": Planar(net) if planar else net}

    def loss(self, class_weights: torch.Tensor | None) -> nn.Module:
        return nn.CrossEntropyLoss(weight=class_weights)

    def train_step(self, nets: Nets, loss: nn.Module, batch: dict, update: Update,
                   device: torch.device) -> torch.Tensor | float:
        keep = batch["class"] >= 0  # on the host: no wait for the device to decide
        if not keep.any():
            return float("nan")
        x, y = batch["image"], batch["class"]
        if not keep.all():
            x, y = x[keep], y[keep]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, self.config.optimisation.amp):
            value = loss(nets["model"](x), y)
        update("model", value)
        return value.detach()

    def validate(self, nets: Nets, batches: list[dict], device: torch.device) -> dict[str, float]:
        out = evaluate.classification(nets["model"], batches, self.num_classes, device, self._positive_index())
        keep = ("accuracy", "f1", "macro_f1", "roc_auc")
        return {k: out[k] for k in keep} | {"monitor": _finite(out[self.monitor_key()])}

    def _positive_index(self, classes: list[str] | None = None) -> int:
        """The positive class's index for the metrics (0 without one)."""
        return self.positive(classes) or 0 if classes is not None else 0

    def positive(self, classes: list[str]) -> int | None:
        """Index of ``positive_class`` among ``classes`` (None without one)."""
        c = self.config.positive_class
        if c is None:
            return None
        if len(classes) != 2 or c not in classes:
            raise SettingError(f"positive_class {c!r} needs two classes including it, not {classes}")
        return classes.index(c)

    def sampling(self) -> dict[str, Any]:
        """Volumes drawn class-balanced; with patch targets from the segmentation,
        ``positive_share`` of the patches centred on the positive label and the rest half on an
        organ, half anywhere (inference sees every window, not only those on an organ); else
        every patch on a labelled voxel."""
        s = self.config.sampling
        if s.positive_label is None:
            return dict(class_balanced=True, foreground_oversample=1.0)
        if self.config.positive_class is None:
            raise SettingError("positive_label needs positive_class (the class a patch holding that label has)")
        return dict(class_balanced=True, foreground_oversample=1 / 2,
                    class_from_label=(s.positive_label, s.min_positive_voxels, self.config.positive_class),
                    focus=(s.positive_label, s.positive_share) if s.positive_share > 0 else None)

    def class_counts(self, data: RunData) -> tuple[dict[int, int], int]:
        counts: dict[int, int] = defaultdict(int)
        for r in catalog.read_table(data.store, "classes").to_pylist():
            if r["label"] in data.classes:
                counts[data.classes.index(r["label"])] += 1
        return dict(counts), max(2, len(data.classes))

    def _volumes(self, data: RunData, net: nn.Module, split: str, threshold: float | None = None):
        ids, truths = data.volume_classes(data.volumes(split))
        if not ids:
            return None, truths
        return evaluate.classification_volumes(net, data.root, ids, truths, self.num_classes,
                                               self.config.sampling.patch_size, data.device,
                                               self.positive(data.classes), threshold), truths

    def volume_validator(self, data: RunData):
        if not data.volume_classes(data.volumes("validation"))[0]:
            return None
        positive = self.positive(data.classes)

        def validate(nets: Nets) -> dict[str, float]:
            out, truths = self._volumes(data, nets["model"], "validation")
            scores = {k: out[k] for k in ("accuracy", "f1", "macro_f1", "roc_auc")}
            if positive is None:
                return scores | {"monitor": _finite(out["macro_f1"])}
            # detection: the ranking (ROC-AUC) picks the checkpoint; ties are broken by the gap
            # between the lowest positive and the highest negative score (``margin``), and the
            # operating threshold is the one that maximises F1 on these volumes: a volume's
            # probability is its largest window's, so the patch-level 0.5 is no operating point
            p, truth = out["_scores"][:, positive], np.asarray(truths) == positive
            margin = float(p[truth].min() - p[~truth].max()) if truth.any() and (~truth).any() else 0.0
            return scores | {"margin": margin, "threshold": evaluate.operating_threshold(p, truth),
                             "monitor": _finite(out["roc_auc"]) + 0.01 * margin}

        return validate

    def evaluate(self, data: RunData, nets: Nets, threshold: float | None = None) -> dict[str, Any]:
        """The volumes' classes (what a user asks for), with patch metrics alongside."""
        net = nets["model"]
        patches = evaluate.classification(net, self.test_batches(data), self.num_classes, data.device,
                                          self._positive_index(data.classes))
        out, _ = self._volumes(data, net, "test", threshold)
        out = out or {}
        out.pop("_scores", None)
        if threshold is not None:
            out["threshold"] = threshold
        return out | {f"patch_{k}": v for k, v in patches.items() if k in ("accuracy", "f1", "roc_auc", "samples")}

    def predictor(self, config, info, model, device) -> Predictor:
        return ClassificationPredictor(config, info, model, self.config, self.num_classes, device)


def _finite(value: float) -> float:
    return 0.0 if np.isnan(value) else float(value)


class ClassificationPredictor(Predictor):
    """Windows over the preprocessed volume, the volume's class probabilities (a class's
    maximum over windows for binary detection: a lesion seen anywhere counts) and, per
    ``InferConfig.explain``, a Grad-CAM map with its QC image."""

    def positive(self, n_probs: int | None = None) -> int | None:
        classes, c = self.classes(), self.train.positive_class
        if c not in classes or (n_probs is not None and n_probs != 2):
            return None
        return classes.index(c)

    def read(self, volume_id: str):
        return self.load_image(volume_id)

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> np.ndarray:
        image = image.to(self.device, non_blocking=True)
        # an ensemble: the mean of its members' volume probabilities
        return np.mean([evaluate.volume_probabilities(evaluate.window_probabilities(
            model, image, self.train.sampling.patch_size, self.device), self.positive()) for model in self.members], 0)

    def decision(self, probs: np.ndarray) -> int:
        """The predicted class index: with the model's operating threshold (tuned on
        validation, recorded in the registry) the positive class when its probability reaches
        it, else the most probable class."""
        return int(metrics.decide(probs[None], self.positive(len(probs)), self.info["config"].get("threshold"))[0])

    def compute(self, volume_id: str, loaded) -> tuple[np.ndarray, str | None]:
        """The probabilities, and Grad-CAM in the thread that runs the model (it hooks the
        model's layers)."""
        probs = self.probabilities(loaded[1])
        return probs, self._explain(volume_id, probs)

    def _explain(self, volume_id: str, probs: np.ndarray) -> str | None:
        if self.config.explain == "none":
            return None
        predicted = self.decision(probs)
        positive = self.positive()
        if self.config.explain == "positive" and positive is not None and predicted != positive:
            return None
        _, png = explain_stored(self.config.store, self.info["config"]["version"],
                                f"{self.config.name}-{self.version}", self.model, self.train.sampling.patch_size,
                                volume_id, predicted, self.device)
        return str(png)

    def finish(self, volume_id: str, loaded, computed) -> tuple[dict, list[dict]]:
        probs, qc_image = computed
        classes = self.classes()
        k = self.decision(probs)
        return self.row(volume_id, loaded[0]) | {
            "classes": classes[: len(probs)], "probabilities": [float(v) for v in probs],
            "prediction": classes[k] if classes else str(k), "qc_image": qc_image}, []
