"""What bulk inference is configured with, and the predictor every predicting task implements.

A :class:`Predictor` predicts one volume in three stages, which ``models.infer`` overlaps
across volumes on a GPU: ``read`` (I/O: the preprocessed copy, and whatever else the task
needs), ``compute`` (the model's thread: the network, and anything that hooks its layers) and
``finish`` (post-processing and writes: the prediction row, lesion rows, labels in the store).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from voxelflow import catalog
from voxelflow.store import open_volume

if TYPE_CHECKING:
    from models.config import TrainConfig


class InferConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    store: str
    name: str  # registry name
    version: str | None = None  # default: the registry's current version
    split: str | None = None  # only volumes of this split
    volumes: list[str] | None = None
    overlap: float = 0.25
    # sliding windows per model call; default: 2 on a CPU, 16 on a GPU (a small U-Net on two
    # windows leaves a large GPU waiting on kernel launches)
    sw_batch_size: int | None = None
    min_voxels: int = 10  # smaller connected components are not reported as lesions
    # Grad-CAM maps (and QC images) for classifiers: of every volume, of the volumes predicted
    # as the model's positive class (a finding to look at; every volume when it has none), or none
    explain: Literal["all", "positive", "none"] = "positive"
    # predict with the ensemble of a cross-validated run's folds: "latest" (the newest run of
    # ``name``) or its group id; None: one version
    ensemble: str | None = None


class Predictor:
    """One registered model's predictions of stored volumes (see the module's docstring)."""

    def __init__(self, config: InferConfig, info: dict[str, Any], model: torch.nn.Module, train: TrainConfig,
                 num_classes: int, device: torch.device):
        self.config, self.info, self.model, self.train = config, info, model, train
        self.num_classes, self.device = num_classes, device
        # an ensemble's members (``models.ensemble``), else the model alone: predictors average
        # the members' probabilities of a whole volume, each as that member alone would give them
        self.members = list(getattr(model, "members", [model]))

    @property
    def version(self) -> str:
        return self.info["version"]

    @property
    def preprocessed(self) -> str:
        """The preprocessed copy the model was trained on (and predicts from)."""
        return f"{self.config.store}/preprocessed/{self.info['config']['version']}"

    def read(self, volume_id: str) -> Any:
        raise NotImplementedError

    def compute(self, volume_id: str, loaded: Any) -> Any:
        raise NotImplementedError

    def finish(self, volume_id: str, loaded: Any, computed: Any) -> tuple[dict, list[dict]]:
        raise NotImplementedError

    def predict(self, volume_id: str) -> tuple[dict, list[dict]]:
        """The three stages in a row: the prediction row and its lesion rows."""
        loaded = self.read(volume_id)
        return self.finish(volume_id, loaded, self.compute(volume_id, loaded))

    # -- shared by the tasks' predictors -------------------------------------------------------

    def load_image(self, volume_id: str):
        """The volume's preprocessed copy and its voxels as a ``(1, 1, z, y, x)`` float tensor."""
        pre = open_volume(self.preprocessed, volume_id)
        return pre, torch.from_numpy(np.ascontiguousarray(pre.array[...], dtype=np.float32))[None, None]

    def classes(self) -> list[str]:
        """The class names the model was trained with (older registry entries: the catalog's)."""
        return self.info["config"].get("classes") or \
            sorted({r["label"] for r in catalog.read_table(self.config.store, "classes").to_pylist()})

    def window_batch(self) -> int:
        return self.config.sw_batch_size or (16 if self.device.type == "cuda" else 2)

    def row(self, volume_id: str, pre) -> dict[str, Any]:
        """A prediction row with the fields every task fills in left empty."""
        return {"volume_id": volume_id, "model": self.config.name, "version": self.version, "task": self.train.task,
                "label_name": None, "classes": [], "probabilities": [], "prediction": None, "qc_image": None,
                "created_at": datetime.now(timezone.utc).replace(microsecond=0),
                "input_digest": pre.attributes.get("digest"), "members": self.info.get("members")}
