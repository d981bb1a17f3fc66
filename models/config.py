"""What a training run is configured with: the task and its target, and four typed parts.

``TrainConfig(task=..., network=NetworkConfig(...), sampling=..., optimisation=...,
postprocess=...)``; every field of a part is also accepted by its own name at the top level
(``TrainConfig(patch_size=(16, 32, 32), lr=1e-3)``, a JSON file of flat fields, ``--set
lr=1e-3``), so configuration files and registry entries written before the parts existed still
load. :meth:`TrainConfig.flat` gives that flat form back (the registry's version identity is
computed on it, so a retrained model keeps its version id).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.tasks import task_class


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NetworkConfig(_Part):
    """The network's shape (which network: the task's; see ``models.tasks``)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)  # feature maps per resolution level
    dropout: float = 0.1
    latent_size: int = 64  # a GAN generator's input
    # a classifier's global pooling: "max" for detection (a small finding anywhere in the patch)
    pooling: Literal["avg", "max"] = "avg"
    # a classifier's normalisation: "instance" keeps its output for windows unlike the training
    # batches (inference slides over the whole volume) from shifting with batch statistics
    norm: Literal["batch", "instance"] = "batch"
    # a classifier's first convolution's stride (see ``models.tasks.classification``)
    stem_stride: int = Field(1, ge=1, le=4)


class SamplingConfig(_Part):
    """Which patches training and validation see, and how they are loaded."""

    # (z, y, x) voxels; a classifier's patch one voxel deep, (1, y, x), makes it a 2-D slice
    # classifier (models.networks.Planar), which sees far more patches per second than a 3-D one
    patch_size: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 2
    steps_per_epoch: int = 25
    val_steps: int = 10
    num_workers: int = 0
    # decoded chunks each data-loading process keeps (ZarrPatchDataset ``cache_mb``): patches
    # drawn again from the same volumes decode nothing twice; per loader worker
    cache_mb: float = Field(512, ge=0)
    # Binary classification as detection: with ``positive_label`` a training patch's target
    # comes from the segmentation (positive when it holds at least ``min_positive_voxels``
    # voxels of that label value), not from the volume's class, which a patch that misses the
    # lesion would contradict; ``positive_share`` of the training patches are centred on a
    # voxel of that label (lesions are a sliver of the volume: a classifier that rarely sees
    # them learns the prior, not the lesion).
    positive_label: int | None = None
    min_positive_voxels: int = 8
    positive_share: float = Field(0.5, ge=0.0, le=1.0)


class OptimisationConfig(_Part):
    """How the weights are fitted."""

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    early_stopping: int = 5  # epochs without a better validation monitor before stopping
    seed: int = 0
    # Mixed precision (bf16 autocast on CUDA; no effect on a CPU). Off by default: a small
    # network's step waits on kernel launches, so autocast only adds cast kernels (measured in
    # bench/train.py). Turn it on for wide networks or large patches (compute-bound steps).
    amp: bool = False
    # cuDNN autotuning of the convolutions on CUDA, unless deterministic kernels are asked for;
    # off by default for the same reason as ``amp`` (bench/train.py). Inference turns it on.
    cudnn_benchmark: bool = False
    # "inverse" (inverse class frequency), "sqrt" (its square root) or "none"; default: the
    # task's (segmentation none: its Dice term already balances classes; classification inverse)
    class_weighting: Literal["none", "sqrt", "inverse"] | None = None
    denoise_std: float = 0.1  # autoencoder input noise, in units of the image's std


class PostprocessConfig(_Part):
    """What is done to a prediction before it is scored or stored."""

    keep_largest: tuple[int, ...] = ()  # segmentation classes kept as their largest component


_PARTS: dict[str, type[_Part]] = {"network": NetworkConfig, "sampling": SamplingConfig,
                                  "optimisation": OptimisationConfig, "postprocess": PostprocessConfig}
# flat field name -> the part that holds it (names are unique across parts)
_FIELD_PART = {f: part for part, cls in _PARTS.items() for f in cls.model_fields}


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # a name of ``models.tasks.TASKS``
    task: str = "segmentation"
    # segmentation: label values merged before training and evaluation, {from: to}; e.g. {2: 1}
    # makes a liver model of a liver (1) + lesion (2) label map, lesions counted as liver as
    # in LiTS's liver task (values not named keep theirs; classes are 0..largest value after)
    label_map: dict[int, int] = {}
    # binary classification as detection: the class a volume has when any window of it shows
    # it (volume probability = the largest window probability)
    positive_class: str | None = None
    network: NetworkConfig = NetworkConfig()
    sampling: SamplingConfig = SamplingConfig()
    optimisation: OptimisationConfig = OptimisationConfig()
    postprocess: PostprocessConfig = PostprocessConfig()

    @model_validator(mode="before")
    @classmethod
    def _route_flat_fields(cls, data: Any) -> Any:
        """Flat fields (``patch_size=...``) go into their part; a part given both as a whole
        and field by field is merged, the flat fields winning."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        moved: dict[str, dict] = {}
        for key in [k for k in data if k in _FIELD_PART]:
            moved.setdefault(_FIELD_PART[key], {})[key] = data.pop(key)
        for part, fields in moved.items():
            given = data.get(part, {})
            base = given.model_dump() if isinstance(given, BaseModel) else dict(given or {})
            data[part] = base | fields
        return data

    @model_validator(mode="after")
    def _the_task_accepts_it(self):
        if any(k < 0 or v < 0 for k, v in self.label_map.items()):
            raise ValueError(f"label_map values must be >= 0: {self.label_map}")
        task_class(self.task).check(self)
        return self

    @classmethod
    def field_names(cls) -> set[str]:
        """Every setting a user may name: the top-level fields, each part's fields by their
        own name, and ``part.field``."""
        top = {k for k in cls.model_fields if k not in _PARTS}
        return top | set(_FIELD_PART) | {f"{p}.{f}" for f, p in _FIELD_PART.items()}

    def flat(self) -> dict[str, Any]:
        """Every setting under its own name, as configuration files write them."""
        out = self.model_dump(exclude=set(_PARTS))
        for part in _PARTS:
            out |= getattr(self, part).model_dump()
        return out

    def replace(self, **settings) -> TrainConfig:
        """A copy with ``settings`` (flat or dotted names) changed, validated again."""
        return TrainConfig(**(self.flat() | undot(settings)))


def undot(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"sampling.patch_size": v}`` -> ``{"patch_size": v}`` (names are unique across parts)."""
    return {k.partition(".")[2] if k.partition(".")[0] in _PARTS else k: v for k, v in settings.items()}
