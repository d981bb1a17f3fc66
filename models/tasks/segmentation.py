"""Segmentation: a 3-D residual U-Net (MONAI ``UNet``) trained with Dice + cross-entropy on
labelled patches, validated and tested by sliding-window Dice over whole volumes, predicting
label maps that are stored on the original volume's grid with their lesions measured."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models import evaluate, metrics
from models.evaluate import keep_largest
from models.lesions import components
from models.networks import autocast
from models.predict import Predictor
from models.tasks.base import Nets, RunData, Task, Update
from voxelflow import catalog
from voxelflow.labels import grid_mapping, resample_nearest
from voxelflow.store import open_volume, write_label

if TYPE_CHECKING:
    from models.config import TrainConfig


class Segmentation(Task):
    name = "segmentation"
    monitor = "dice"
    uses_label = True
    predicts = True
    planned = True

    @classmethod
    def check(cls, config: TrainConfig) -> None:
        cls.refuse_planar(config)  # a label map is this task's own setting

    def networks(self) -> Nets:
        from monai.networks.nets import UNet

        n = self.config.network
        channels = tuple(int(c) for c in n.channels)
        return {"model": UNet(spatial_dims=3, in_channels=1, out_channels=self.num_classes, channels=channels,
                              strides=(2,) * (len(channels) - 1), num_res_units=2, norm="INSTANCE",
                              dropout=n.dropout)}

    def loss(self, class_weights: torch.Tensor | None) -> nn.Module:
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True, weight=class_weights)

    def train_step(self, nets: Nets, loss: nn.Module, batch: dict, update: Update,
                   device: torch.device) -> torch.Tensor:
        x = batch["image"].to(device, non_blocking=True)
        with autocast(device, self.config.optimisation.amp):
            value = loss(nets["model"](x), batch["label"].to(device, non_blocking=True))
        update("model", value)
        return value.detach()

    def validate(self, nets: Nets, batches: list[dict], device: torch.device) -> dict[str, float]:
        scores = []
        for b in batches:
            with autocast(device, self.config.optimisation.amp):
                pred = nets["model"](b["image"].to(device)).argmax(1, keepdim=True)
            scores.append(metrics.dice_per_class(pred.cpu(), b["label"], self.num_classes))
        values = torch.cat(scores)
        dice = float(values.nanmean()) if (~values.isnan()).any() else 0.0
        return {"dice": dice, "monitor": dice}

    def sampling(self) -> dict[str, Any]:
        return {"label_map": self.config.label_map} if self.config.label_map else {}

    def class_counts(self, data: RunData) -> tuple[dict[int, int], int]:
        counts: dict[int, int] = defaultdict(int)
        merged = self.config.label_map
        for r in catalog.read_table(data.store, "labels").to_pylist():
            if r["name"] == data.label_name:
                for v, n in zip(r["values"], r["voxels"]):
                    counts[merged.get(int(v), int(v))] += int(n)
        return dict(counts), max(2, max(counts, default=1) + 1)

    def _score(self, data: RunData, net: nn.Module, split: str, hausdorff: bool) -> dict[str, Any]:
        return evaluate.segmentation(net, data.root, data.volumes(split, labelled=True), self.config.sampling.patch_size,
                                     self.num_classes, data.device, data.label_name,
                                     largest=self.config.postprocess.keep_largest, hausdorff=hausdorff,
                                     label_map=self.config.label_map)

    def volume_validator(self, data: RunData):
        if not data.volumes("validation", labelled=True):
            return None

        def validate(nets: Nets) -> dict[str, float]:
            out = self._score(data, nets["model"], "validation", hausdorff=False)
            dice = 0.0 if np.isnan(out["dice"]) else out["dice"]
            return {"dice": dice, **{k: v for k, v in out.items() if k.startswith("dice_")}, "monitor": dice}

        return validate

    def evaluate(self, data: RunData, nets: Nets, threshold: float | None = None) -> dict[str, Any]:
        return self._score(data, nets["model"], "test", hausdorff=True)

    def predictor(self, config, info, model, device) -> Predictor:
        return SegmentationPredictor(config, info, model, self.config, self.num_classes, device)


@dataclass
class _Target:
    """The original volume's grid, where a segmentation is stored: its shape and the map from
    its array index to the preprocessed grid's (None: the same grid)."""

    shape: tuple[int, int, int]
    m_zyx: np.ndarray | None
    mapping: str
    warnings: list[str]


@dataclass
class _Segmented:
    """A segmentation model's output for one volume: class probabilities ``(classes, z, y, x)``
    and labels on the model's grid; the labels on the original grid unless ``keep_largest``
    post-processing (scipy, on the host) comes first."""

    probs: np.ndarray
    pred: np.ndarray
    mapped: np.ndarray | None


class SegmentationPredictor(Predictor):
    """Sliding-window inference on the preprocessed copy (the grid the model was trained on),
    the prediction mapped back onto the original volume's grid and stored as its OME-Zarr label
    ``prediction-<model>`` (provenance in the label's attributes); connected components of every
    foreground class become lesion rows."""

    def read(self, volume_id: str):
        pre, image = self.load_image(volume_id)
        original = open_volume(self.config.store, volume_id)
        shape = tuple(int(n) for n in original.array.shape[-3:])
        m_zyx, mapping, warnings = grid_mapping(tuple(image.shape[-3:]), pre.affine, shape, original.affine,
                                                where=volume_id, min_coverage=0.0)
        return pre, image, _Target(shape, m_zyx, mapping, warnings)

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(classes, z, y, x)`` on the inference device."""
        batch = self.window_batch()
        total = None
        for model in self.members:  # an ensemble: the mean of its members' probabilities
            predictor = _fixed_batch(model, batch) if self.device.type == "cuda" else model
            logits = evaluate.sliding_logits(model, image, self.train.sampling.patch_size, self.device,
                                             sw_batch_size=batch, overlap=self.config.overlap, predictor=predictor)
            probs = torch.softmax(logits.float(), 1)[0]
            total = probs if total is None else total.add_(probs)
        return total / len(self.members)

    @torch.no_grad()
    def compute(self, volume_id: str, loaded) -> _Segmented:
        """The sliding window, then softmax, argmax and the mapping back onto the original grid
        on the inference device (on a GPU: milliseconds, where the host's argmax and scipy's
        resampling took most of a volume's time); one copy of each to the host."""
        _, image, target = loaded
        probs = self.probabilities(image)
        if self.device.type == "cpu":  # numpy's argmax over the class axis is several times torch's on a CPU
            pred = torch.from_numpy(probs.numpy().argmax(0).astype(np.uint8))
        else:
            pred = probs.argmax(0).to(torch.uint8)
        mapped = None
        if not self.train.postprocess.keep_largest:
            mapped = pred if target.m_zyx is None else resample_nearest(pred, target.m_zyx, target.shape)
            mapped = mapped.cpu().numpy()
        return _Segmented(probs.cpu().numpy(), pred.cpu().numpy(), mapped)

    def finish(self, volume_id: str, loaded, seg: _Segmented) -> tuple[dict, list[dict]]:
        pre, _, target = loaded
        row = self.row(volume_id, pre)
        pred, mapped = seg.pred, seg.mapped
        if mapped is None:  # keep_largest (on the host), then the mapping
            pred = keep_largest(pred, self.train.postprocess.keep_largest)
            mapped = pred if target.m_zyx is None else \
                resample_nearest(torch.from_numpy(pred), target.m_zyx, target.shape).numpy()
        name = f"prediction-{self.config.name}"
        write_label(self.config.store, volume_id, name, mapped, attributes={
            "model": self.config.name, "version": self.version, "members": self.info.get("members"),
            "mapping": target.mapping,
            "warnings": target.warnings, "created_at": row["created_at"].isoformat()})
        counts = np.bincount(pred.ravel(), minlength=self.num_classes)
        row |= {"label_name": name, "prediction": name, "classes": [str(k) for k in range(self.num_classes)],
                "probabilities": [float(counts[k] / pred.size) for k in range(self.num_classes)]}
        lesions = components(pred, seg.probs, pre.affine, volume_id, self.config.name, self.version,
                             self.config.min_voxels)
        return row, lesions


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
