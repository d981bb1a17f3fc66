"""Training plans configured from the data, by nnU-Net's rules: from a dataset's fingerprint
(``voxelflow.fingerprint``) and the memory of the device that will train, the target spacing,
intensity normalisation, patch size, batch size and network depth.

The rules, as nnU-Net v2's experiment planner states them, adapted to voxelflow's U-Net (MONAI
``UNet``, which pools every axis at each level):

- spacing: the fingerprint's target spacing (median; the 10th percentile on a much coarser
  axis);
- normalisation: CT windowed to the foreground's 0.5-99.5 percentiles (nnU-Net's CT
  normalisation clips there), other modalities z-scored;
- patch: a 256^3-voxel box shaped by the inverse spacing (isotropic in millimetres), no larger
  than the median volume; pooled while every axis stays at least 4 voxels deep (at most 5
  levels), each axis a multiple of the pooling; while it does not fit in memory, the axis
  largest relative to the median volume shrinks by one pooling step;
- channels: 32 at the top, doubling per level, at most 320;
- batch: as many patches as fit (at least 2), and no more than cover 5 % of the dataset's
  voxels (a large batch of a small dataset repeats itself).

Memory is not guessed from a formula: the task's network runs forward on PyTorch's ``meta``
device (shapes only, no compute) and the tensors autograd saves for the backward pass are
counted, plus weights, gradients and the AdamW moments. Explicit settings win field by field
(:func:`apply`).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from models.config import TrainConfig
from models.run import TrainRun
from models.tasks import task_class, task_for
from voxelflow import registry
from voxelflow.errors import SettingError
from voxelflow.fingerprint import Fingerprint, describe, fingerprint

PATCH_VOXELS = 256 ** 3  # nnU-Net's starting patch volume for 3-D configurations
MIN_FEATURE_MAP = 4  # the coarsest level keeps at least this many voxels on every axis
MAX_LEVELS = 5  # resolution levels of the U-Net (4 poolings)
BASE_CHANNELS, MAX_CHANNELS = 32, 320
MIN_BATCH = 2
MAX_DATASET_SHARE = 0.05  # of all voxels, one batch at most
# what a plan may fill of the budget: the rest is the allocator's fragmentation, cuDNN's
# workspaces and the data loader's pinned batches, which the meta-device count does not see
BUDGET_SHARE = 0.85
# the step's peak over the activations autograd saves: backward's gradient buffers and the
# kernels' workspaces come on top (the estimate stays above the measured peak of a real
# step with this factor: bench/plan_memory.py)
ACTIVATION_PEAK = 2.0
# a CPU trains on what its cores compute in reasonable time, not on what fits in its RAM:
# its "memory" for planning is this (``--memory-gb`` sets another)
CPU_BUDGET_BYTES = 2 * 2 ** 30
# what the CUDA context and the framework take before the first tensor
CUDA_RESERVED_BYTES = 1 * 2 ** 30

PLANNED_FIELDS = ("patch_size", "batch_size", "channels")


class Plan(BaseModel):
    """A plan: what was decided and what it was decided from."""

    model_config = ConfigDict(frozen=True)

    fingerprint: str  # the fingerprint's digest
    task: str
    device: str  # the device whose memory it was sized for ("cuda:0 NVIDIA H100", "cpu")
    memory_bytes: int  # that device's budget
    spacing: tuple[float, float, float]  # (x, y, z) mm
    ct_window: tuple[float, float] | None  # CT's normalisation window (None: no CT)
    mr_normalization: str
    median_shape: tuple[int, int, int]  # (z, y, x) at ``spacing``
    patch_size: tuple[int, int, int]
    batch_size: int
    channels: tuple[int, ...]
    estimated_bytes: int  # what training with this plan is estimated to take
    fingerprint_facts: dict[str, Any] = {}

    def plan_id(self) -> str:
        return hashlib.sha256(self.model_dump_json(exclude={"fingerprint_facts"}).encode()).hexdigest()[:12]

    def train_settings(self) -> dict[str, Any]:
        """The TrainConfig fields the plan decides, flat."""
        return {"patch_size": self.patch_size, "batch_size": self.batch_size, "channels": self.channels}

    def preprocess_settings(self) -> dict[str, Any]:
        """The PreprocessConfig fields the plan decides."""
        return {"spacing": self.spacing, "mr_normalization": self.mr_normalization,
                **({"ct_window": self.ct_window} if self.ct_window is not None else {})}

    def table(self) -> list[dict[str, Any]]:
        """Rows of (setting, value, why) for a terminal or a Prefect table artifact."""
        mib = 2 ** 20
        return [
            {"setting": "target spacing (x, y, z) mm", "value": list(self.spacing),
             "why": "median spacing; 10th percentile on a much coarser axis"},
            {"setting": "CT window", "value": list(self.ct_window) if self.ct_window else "-",
             "why": "foreground 0.5-99.5 percentiles"},
            {"setting": "MR normalisation", "value": self.mr_normalization, "why": "z-score over the foreground"},
            {"setting": "median shape (z, y, x)", "value": list(self.median_shape), "why": "at the target spacing"},
            {"setting": "patch size (z, y, x)", "value": list(self.patch_size),
             "why": "256^3 voxels shaped by the spacing, within the median volume and the memory"},
            {"setting": "network channels", "value": list(self.channels),
             "why": f"{len(self.channels)} levels: every axis >= {MIN_FEATURE_MAP} voxels at the coarsest"},
            {"setting": "batch size", "value": self.batch_size,
             "why": f"fits the memory, >= {MIN_BATCH}, <= {MAX_DATASET_SHARE:.0%} of the dataset's voxels"},
            {"setting": "memory (estimated / budget)", "value": f"{self.estimated_bytes / mib:.0f} / "
                                                                  f"{self.memory_bytes / mib:.0f} MiB",
             "why": f"{self.device}; forward pass on the meta device"},
            *({"setting": k, "value": v, "why": "fingerprint"} for k, v in self.fingerprint_facts.items()),
        ]


def device_memory(device: torch.device | None = None) -> tuple[int, str]:
    """``(bytes, name)``: the planning budget of ``device`` (default: this process's training
    device): a GPU's total memory less the CUDA context, or :data:`CPU_BUDGET_BYTES`."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(props.total_memory) - CUDA_RESERVED_BYTES, f"{device} {props.name}"
    return CPU_BUDGET_BYTES, "cpu"


def estimate_bytes(config: TrainConfig, num_classes: int = 2) -> int:
    """Bytes one training step of ``config`` holds at its peak: the activations autograd saves
    in the forward pass (counted on the meta device, so a 128^3 patch costs no compute) times
    :data:`ACTIVATION_PEAK`, the input batch, the network's output and the loss's copies of it,
    and weights, gradients and AdamW's two moments."""
    s = config.sampling
    with torch.device("meta"):
        nets = task_for(config, num_classes).networks()
        x = torch.zeros(s.batch_size, 1, *s.patch_size)
    saved = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    params = sum(p.numel() * p.element_size() for net in nets.values() for p in net.parameters())
    net = nets["model"] if "model" in nets else next(iter(nets.values()))
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        y = net(x)
    output = y.numel() * y.element_size()
    # softmax, one-hot target and the Dice terms each hold an output-sized tensor
    return int(ACTIVATION_PEAK * saved + 2 * x.numel() * x.element_size() + 3 * output + 4 * params)


def make_plan(fp: Fingerprint, task: str = "segmentation", memory: tuple[int, str] | None = None,
              base: TrainConfig | None = None, fixed: dict[str, Any] | None = None,
              num_classes: int | None = None) -> Plan:
    """The plan for training ``task`` on the data of ``fp`` within ``memory`` (``(bytes,
    device name)``; default: this process's device).

    Args:
        base: the other settings of the run (its dropout, its task's options); default: the
            task's defaults.
        fixed: settings the user gave (``patch_size``, ``batch_size``, ``channels``): kept as
            given, the rest planned around them.
        num_classes: network outputs (default: the label values of the fingerprint).

    Raises:
        SettingError: not even the smallest patch fits the memory.
    """
    fixed = dict(fixed or {})
    budget, device = memory or device_memory()
    usable = int(budget * BUDGET_SHARE)
    base = base or TrainConfig(task=task)
    n_out = num_classes or max(2, max(fp.class_voxels, default=1) + 1)
    spacing = fp.spacings[0] if fp.version is not None else fp.target_spacing()
    median = fp.median_shape(spacing)
    total = fp.total_voxels(spacing)

    def config(patch, batch, channels) -> TrainConfig:
        return base.replace(patch_size=tuple(patch), batch_size=batch, channels=tuple(channels))

    patch = list(fixed.get("patch_size") or _initial_patch(spacing, median))
    while True:
        levels = len(fixed["channels"]) if "channels" in fixed else _levels(patch)
        step = 2 ** (levels - 1)
        if "patch_size" not in fixed:
            patch = [max(step, (p // step) * step) for p in patch]
        channels = tuple(fixed.get("channels") or _channels(levels))
        batch = fixed.get("batch_size", MIN_BATCH)
        need = estimate_bytes(config(patch, batch, channels), n_out)
        if need <= usable or "patch_size" in fixed:
            break
        # shrink the axis largest against the median volume by one pooling step
        ratios = [p / m for p, m in zip(patch, median)]
        axis = max((a for a in range(3) if patch[a] > MIN_FEATURE_MAP), key=lambda a: ratios[a], default=None)
        if axis is None:
            break
        patch[axis] = max(MIN_FEATURE_MAP, patch[axis] - step)
    if need > usable:
        raise SettingError(f"the plan for {task}: patch {tuple(patch)} x batch {batch} needs an estimated "
                           f"{need / 2 ** 20:.0f} MiB, more than {usable / 2 ** 20:.0f} MiB of {device}")
    if "batch_size" not in fixed:
        one = estimate_bytes(config(patch, 1, channels), n_out)
        per_sample = max(1, estimate_bytes(config(patch, 2, channels), n_out) - one)
        fits = MIN_BATCH + (usable - need) // per_sample
        covers = math.floor(MAX_DATASET_SHARE * total / math.prod(patch))
        batch = int(max(MIN_BATCH, min(fits, covers)))
        need = estimate_bytes(config(patch, batch, channels), n_out)
    ct = fp.intensity.get("CT")
    return Plan(fingerprint=fp.digest(), task=task, device=device, memory_bytes=budget, spacing=tuple(spacing),
                ct_window=(ct.p00_5, ct.p99_5) if ct is not None and ct.voxels else None,
                mr_normalization="zscore", median_shape=median, patch_size=tuple(int(p) for p in patch),
                batch_size=batch, channels=channels, estimated_bytes=need, fingerprint_facts=describe(fp))


def _initial_patch(spacing, median) -> list[int]:
    """nnU-Net's start: 256^3 voxels shaped by the inverse spacing, within the median volume."""
    inverse = 1.0 / np.asarray(spacing, dtype=float)[::-1]  # (z, y, x)
    box = inverse * (PATCH_VOXELS / np.prod(inverse)) ** (1 / 3)
    return [int(min(round(b), m)) for b, m in zip(box, median)]


def _levels(patch) -> int:
    """Resolution levels: pool while every axis keeps at least MIN_FEATURE_MAP voxels."""
    pools = min(int(math.floor(math.log2(max(p, 1) / MIN_FEATURE_MAP))) for p in patch)
    return int(min(MAX_LEVELS, max(2, pools + 1)))


def _channels(levels: int) -> tuple[int, ...]:
    return tuple(min(MAX_CHANNELS, BASE_CHANNELS * 2 ** i) for i in range(levels))


def plannable(task: str) -> bool:
    """Whether ``task`` is planned (a 3-D network whose patch and depth the rules fit)."""
    return task_class(task).planned


def explicit_settings(config: TrainConfig) -> dict[str, Any]:
    """The planned fields ``config`` was given explicitly (those a plan must keep)."""
    given = {"patch_size": "patch_size" in config.sampling.model_fields_set,
             "batch_size": "batch_size" in config.sampling.model_fields_set,
             "channels": "channels" in config.network.model_fields_set}
    flat = config.flat()
    return {k: flat[k] for k, was in given.items() if was}


def needs_plan(config: TrainConfig) -> bool:
    """A plannable task with at least one planned field left to its default."""
    return plannable(config.task) and len(explicit_settings(config)) < len(PLANNED_FIELDS)


def apply(config: TrainConfig, plan: Plan) -> TrainConfig:
    """``config`` with the plan's settings where it gave none (explicit settings win)."""
    return config.replace(**(plan.train_settings() | explicit_settings(config)))


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as the registry stores it."""
    return json.loads(plan.model_dump_json()) | {"plan_id": plan.plan_id()}


def output_classes(fp: Fingerprint, config: TrainConfig) -> int:
    """The segmentation network's outputs: the fingerprint's label values after the run's
    ``label_map`` (at least background and one class)."""
    values = {config.label_map.get(v, v) for v in fp.class_voxels}
    return max(2, max(values, default=1) + 1)


def plan_run(run: TrainRun, memory: tuple[int, str] | None = None) -> tuple[TrainRun, Plan]:
    """``run`` with the settings it did not give planned from its preprocessed copy's
    fingerprint for ``memory`` (default: this process's training device), and the plan, which
    is saved in the store's registry (``STORE/plans/<id>.json``). The copy is normalised
    already: its plan reads the catalog only, no volume."""
    fp = fingerprint(run.store, run.label_name, version=run.version, intensities=False)
    plan = make_plan(fp, run.train.task, memory, base=run.train, fixed=explicit_settings(run.train),
                     num_classes=output_classes(fp, run.train))
    registry.save_plan(run.store, plan_json(plan))
    return run.model_copy(update={"train": apply(run.train, plan), "plan": plan.plan_id()}), plan
