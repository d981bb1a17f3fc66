"""What every ML task provides, and the data of a training run that tasks read.

A task (``models.tasks.segmentation.Segmentation``, ...) owns everything that differs between
tasks: its networks, optimisers and loss, one training step, validation on patches or whole
volumes, the test evaluation, what an exported model takes as input, and, for tasks that
predict stored volumes, its inference predictor. The training loop (``models.train.fit``), the
run (``models.run``) and bulk inference (``models.infer``) are the same for every task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from voxelflow import catalog
from voxelflow.data import make_loader, patch_dataset
from voxelflow.errors import SettingError

if TYPE_CHECKING:
    from models.config import TrainConfig
    from models.predict import InferConfig, Predictor

Nets = dict[str, nn.Module]
# ``update(name, loss)``: one optimiser step of network ``name`` on ``loss`` (zero_grad, scaled
# backward, step), supplied by the training loop
Update = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class RunData:
    """The store side of a training run: where its preprocessed volumes are and which label
    and classes it learns."""

    store: str
    version: str  # the preprocessed copy
    label_name: str
    classes: list[str]
    device: torch.device
    folder: Path  # the registry version's folder
    # a cross-validation fold's own training and validation volumes, drawn inside the train
    # split ("train" / "validation" -> volume ids); None: the catalog's splits
    fold: dict[str, frozenset[str]] | None = None

    @property
    def root(self) -> str:
        return f"{self.store}/preprocessed/{self.version}"

    def volumes(self, split: str, labelled: bool = False) -> list[str]:
        """Finished preprocessed volumes of one split (with a label map, if ``labelled``)."""
        if self.fold is not None and split in self.fold:
            rows = [r for r in catalog.preprocessed_volumes(self.store, self.version, "train")
                    if r["volume_id"] in self.fold[split]]
        else:
            rows = catalog.preprocessed_volumes(self.store, self.version, split)
        return [r["volume_id"] for r in rows if r["classes"] or not labelled]

    def volume_classes(self, ids: list[str]) -> tuple[list[str], list[int]]:
        """The volumes of ``ids`` with one of the run's classes, and their class indices."""
        by_id = {r["volume_id"]: r["label"] for r in catalog.read_table(self.store, "classes").to_pylist()}
        kept = [v for v in ids if by_id.get(v) in self.classes]
        return kept, [self.classes.index(by_id[v]) for v in kept]


class Task:
    """One ML task over 3-D patches. Subclasses set the class attributes and implement the
    methods that raise ``NotImplementedError``; ``models.tasks.TASKS`` lists them by name."""

    name: ClassVar[str]
    # the validation metric that picks the best checkpoint and stops training early (higher
    # is better; ``monitor`` in every validation row is its value)
    monitor: ClassVar[str]
    # patches carry the run's segmentation label (for targets or foreground sampling)
    uses_label: ClassVar[bool] = False
    # class-imbalance weights of the loss unless the configuration names a weighting
    default_weighting: ClassVar[str] = "none"
    # bulk inference over stored volumes is defined (``predictor``)
    predicts: ClassVar[bool] = False
    # patch size, batch size and network depth may come from a plan (``models.plan``) when the
    # run does not set them: a 3-D network whose memory grows with the patch
    planned: ClassVar[bool] = False

    def __init__(self, config: TrainConfig, num_classes: int = 2):
        self.config = config
        self.num_classes = num_classes

    @classmethod
    def check(cls, config: TrainConfig) -> None:
        """Refuse settings this task cannot honour (a ``ValueError`` naming the setting)."""
        cls.refuse_label_map(config)
        cls.refuse_planar(config)

    @classmethod
    def refuse_label_map(cls, config: TrainConfig) -> None:
        if config.label_map:
            raise SettingError(f"label_map merges segmentation classes; a {cls.name} model takes none")

    @classmethod
    def refuse_planar(cls, config: TrainConfig) -> None:
        if int(config.sampling.patch_size[0]) == 1:
            raise SettingError(f"patches one voxel deep (2-D) are for classifiers, not {cls.name}: "
                               f"patch_size {tuple(config.sampling.patch_size)}")

    # -- networks and their training ---------------------------------------------------------

    def networks(self) -> Nets:
        """The task's networks, by the names checkpoints and ``weights.pt`` use."""
        raise NotImplementedError

    def optimizer(self, name: str, net: nn.Module) -> torch.optim.Optimizer:
        o = self.config.optimisation
        return torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)

    def loss(self, class_weights: torch.Tensor | None) -> nn.Module:
        raise NotImplementedError

    def monitor_key(self) -> str:
        """The registry's name of the monitored validation metric."""
        return self.monitor

    def weighting(self) -> str:
        return self.config.optimisation.class_weighting or self.default_weighting

    def train_step(self, nets: Nets, loss: nn.Module, batch: dict, update: Update,
                   device: torch.device) -> torch.Tensor | float:
        """One optimisation step; the loss as a device tensor (``fit`` reads an epoch's losses
        at its end, not once per step), or NaN for a batch without a usable target."""
        raise NotImplementedError

    def validate(self, nets: Nets, batches: list[dict], device: torch.device) -> dict[str, float]:
        """Validation metrics of patches, with ``"monitor"``; the networks are in eval mode."""
        raise NotImplementedError

    # -- a run against a store -----------------------------------------------------------------

    def sampling(self) -> dict[str, Any]:
        """Extra ``patch_dataset`` arguments of this task's training and validation patches."""
        return {}

    def class_counts(self, data: RunData) -> tuple[dict[int, int], int]:
        """Label value -> count for the class weights, and the number of network outputs."""
        return {}, 2

    def volume_validator(self, data: RunData) -> Callable[[Nets], dict[str, float]] | None:
        """Validation on whole validation volumes (as the test evaluation and inference see
        them), or None to validate on patches."""
        return None

    def evaluate(self, data: RunData, nets: Nets, threshold: float | None = None) -> dict[str, Any]:
        """Test-split metrics of the best weights."""
        raise NotImplementedError

    def test_batches(self, data: RunData) -> list[dict]:
        """Patches of the test split, drawn as validation draws them."""
        s = self.config.sampling
        test = patch_dataset(data.store, s.patch_size, version=data.version, split="test",
                             samples_per_epoch=max(8, s.val_steps * s.batch_size),
                             seed=self.config.optimisation.seed + 2,
                             label_name=data.label_name if self.uses_label else None, **self.sampling())
        return list(make_loader(test, batch_size=s.batch_size))

    # -- export and inference ------------------------------------------------------------------

    def deployed(self, weights: dict[str, dict]) -> nn.Module:
        """The network an exported model holds, with ``weights`` (a ``weights.pt``) loaded."""
        nets = self.networks()
        net = nets["model"]
        net.load_state_dict(weights["model"])
        return net

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """An input of the deployed network's shape (export traces and checks with it)."""
        return torch.randn(batch, 1, *self.config.sampling.patch_size, generator=torch.Generator().manual_seed(0))

    def predictor(self, config: InferConfig, info: dict[str, Any], model: nn.Module,
                  device: torch.device) -> Predictor:
        raise SettingError(f"inference is defined for models that predict volumes, not {self.name} "
                           f"(model {config.name!r})")


def class_weights(counts: dict[int, int], n: int, mode: str = "inverse") -> torch.Tensor:
    """Inverse-frequency (or its square root) weights, normalised to mean 1 (missing classes
    count as the rarest)."""
    freq = np.array([counts.get(i, 0) for i in range(n)], dtype=np.float64)
    freq = np.where(freq > 0, freq, freq[freq > 0].min() if (freq > 0).any() else 1.0)
    w = 1.0 / (np.sqrt(freq) if mode == "sqrt" else freq)
    return torch.tensor(w / w.mean(), dtype=torch.float32)
