"""A whole training run against a store: data from the preprocessed copy's splits, ``fit``,
evaluation on the test split, registration and promotion. No Prefect here (``tasks/train.py``
adds artifacts)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models import distributed
from models.config import TrainConfig
from models.distributed import SINGLE, Ranks
from models.tasks import RunData, task_for
from models.train import fit
from voxelflow import location, registry
from voxelflow.augment import AugmentConfig, OnTheFly
from voxelflow.data import patch_dataset
from voxelflow.errors import SettingError


class TrainRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    store: str
    version: str  # the preprocessed copy
    name: str | None = None  # registry name (default: the task)
    train: TrainConfig = TrainConfig()
    augment: bool = True  # on-the-fly augmentation of training patches
    # Its ranges: spatial only by default. No mirroring: body anatomy is lateralised (liver
    # right, spleen left) and a flipped abdomen teaches the network to confuse them. No
    # intensity changes: CT values are calibrated (HU), and gamma/contrast changes blur the
    # 30-60 HU that tell liver from muscle and spleen (README: what it cost on the demo store).
    # Elastic deformation is off for speed (MONAI's 3-D elastic transform costs more than a CPU
    # training step). Pass a full AugmentConfig() for MR or multi-site data.
    augmentation: AugmentConfig = AugmentConfig(flip_prob=0.0, elastic_prob=0.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0),
                                                noise_std=(0.0, 0.0), bias_prob=0.0)
    label_name: str = "segmentation"
    # data-parallel ranks (one per Dask worker, each with its share of every epoch's patches:
    # world_size times the samples of one rank per epoch)
    world_size: int = Field(1, ge=1)
    # how long a rank waits for the others at a collective before the run fails (covers rank
    # 0's whole-volume validation of an epoch)
    rank_timeout_s: float = Field(600.0, gt=0)
    # k-fold cross-validation inside the train split (patient-level, stratified as the split):
    # ``folds`` models, fold ``fold`` validated on its own patients and trained on the others
    folds: int | None = Field(None, ge=2)
    fold: int | None = Field(None, ge=0)
    # the plan (``STORE/plans/<id>.json``) that filled the settings the run did not give; not
    # part of the identity: the same settings, planned or typed, train the same model
    plan: str | None = None

    @model_validator(mode="after")
    def _fold_of_folds(self) -> TrainRun:
        if self.fold is not None and (self.folds is None or self.fold >= self.folds):
            raise SettingError(f"fold {self.fold} needs folds > {self.fold} (folds: {self.folds})")
        return self

    def fold_runs(self) -> list[TrainRun]:
        """One run per fold of a cross-validated run."""
        if not self.folds:
            raise SettingError("fold_runs: this run has no folds")
        return [self.model_copy(update={"fold": k}) for k in range(self.folds)]

    def group_identity(self) -> dict[str, Any]:
        """What the folds of one cross-validated run share (its group id is its digest)."""
        return self.identity() | {"fold": None}

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (the registry version id is its digest): every
        setting but the store, the rank timeout and the plan's name, the training settings in
        their flat form (ids stay those of runs configured before the settings had parts);
        settings added since count only when set away from their default, so older ids stay."""
        out = self.model_dump(exclude={"store", "rank_timeout_s", "plan"}) | {"train": self.train.flat()}
        for key, default in (("world_size", 1), ("folds", None), ("fold", None)):
            if out[key] == default:
                del out[key]
        return out


# A classifier's augmentation of choice on a CPU (the demo's, bench/classifier.py's default):
# flips only, over the spatial default: rotation and scaling cost several times a 2-D slice's
# training step in MONAI's Python, and flips generalised as well on the demo's lesions (README).
FLIPS_ONLY = {"rotate_deg": 0.0, "scale": [1.0, 1.0], "translate_vox": 0.0, "flip_prob": 0.5}


def fold_volumes(run: TrainRun) -> dict[str, frozenset[str]] | None:
    """A fold's training and validation volumes (``voxelflow.labels.make_folds``, seeded by
    the run's seed), or None for a run on the catalog's splits."""
    if run.fold is None:
        return None
    from voxelflow.labels import make_folds

    folds = make_folds(run.store, run.folds, seed=run.train.optimisation.seed)
    return {"train": frozenset(v for v, k in folds.items() if k != run.fold),
            "validation": frozenset(v for v, k in folds.items() if k == run.fold)}


def _run_data(run: TrainRun, classes: list[str], device: torch.device, folder) -> RunData:
    return RunData(run.store, run.version, run.label_name, classes, device, folder, fold_volumes(run))


def _datasets(run: TrainRun):
    """The training and validation patch datasets of ``run`` (of its fold, for a fold)."""
    fold = fold_volumes(run)
    where = {split: ({"split": "train", "volumes": fold[split]} if fold else {"split": split})
             for split in ("train", "validation")}
    c, s = run.train, run.train.sampling
    task = task_for(c)
    kw = task.sampling()
    seed = c.optimisation.seed
    transform = OnTheFly(run.augmentation, seed=seed) if run.augment else None
    label = run.label_name if task.uses_label else None
    train = patch_dataset(run.store, s.patch_size, version=run.version, **where["train"],
                          samples_per_epoch=s.steps_per_epoch * s.batch_size, seed=seed, transform=transform,
                          label_name=label, cache_mb=s.cache_mb, **kw)
    if kw.get("focus") and not train._focus_entries:
        raise SettingError(f"positive_label {s.positive_label}: no training volume has voxels of that label "
                           f"(preprocessed copy {run.version})")
    val = patch_dataset(run.store, s.patch_size, version=run.version, **where["validation"],
                        samples_per_epoch=s.val_steps * s.batch_size, seed=seed + 1, label_name=label,
                        cache_mb=s.cache_mb, **kw)
    return train, val


def train_model(run: TrainRun, *, on_epoch=None, device: torch.device | None = None,
                ranks: Ranks = SINGLE) -> dict[str, Any]:
    """Train (resuming if this exact run was interrupted), evaluate, register, promote.

    With several ``ranks`` every rank calls this: all train; rank 0 then evaluates, registers
    and returns the summary, the others return their rank's figures."""
    if ranks.world != run.world_size:
        raise SettingError(f"rank {ranks.rank} of {ranks.world} started for a run of world_size {run.world_size}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = run.train
    name = run.name or c.task
    snapshot = registry.data_snapshot(run.store, run.version)
    version = registry.version_id(run.identity(), snapshot)
    folder = registry.version_dir(run.store, name, version)
    train, val = _datasets(run)
    data = _run_data(run, train.classes, device, folder)
    counts, num_classes = task_for(c).class_counts(data)
    task = task_for(c, num_classes)
    with distributed.joined(ranks, device):
        result = fit(c, train, val, folder, num_classes=num_classes, class_counts=counts, device=device,
                     on_epoch=on_epoch, validator=task.volume_validator(data), ranks=ranks)
    if not ranks.main:
        last = result["history"][-1] if result["history"] else {}
        return {"name": name, "version": version, "rank": ranks.rank, "device": str(device),
                "samples_per_s": (last.get("rank_samples_per_s") or [None] * ranks.world)[ranks.rank],
                "weights_digest": result["weights_digest"], "stopped": result["stopped"]}
    location.write_bytes(folder / "weights.pt", location.read_bytes(folder / "best.pt"))
    best = location.torch_load(folder / "weights.pt", map_location=device, weights_only=True)
    nets = task.networks()
    for k, net in nets.items():
        net.load_state_dict(best[k])
        net.to(device).eval()
    history = result["history"]
    best_row = next(h for h in history if h["epoch"] == result["best_epoch"])
    threshold = best_row.get("threshold")  # tuned by the validator on the best epoch's volumes
    with torch.no_grad():
        test_metrics = task.evaluate(data, nets, threshold)
    throughput = _throughput(history, ranks.world)
    metrics = {"validation": best_row, "test": test_metrics, "history": history, "stopped": result["stopped"],
               "throughput": throughput}
    config = run.model_dump(exclude={"store"}) | {"classes": train.classes, "threshold": threshold}
    monitor = task.monitor_key()
    registry.register(run.store, name, version, config=config, snapshot=snapshot, metrics=metrics, monitor=monitor)
    promoted = registry.promote_if_better(run.store, name, version)
    _curve(history, folder / "curve.png", f"validation {monitor if monitor != 'monitor' else '-stat distance'}")
    return {"name": name, "version": version, "folder": str(folder), "promoted": promoted, "device": str(device),
            "best_epoch": result["best_epoch"], "validation": best_row, "test": test_metrics,
            "epochs": len(history), "stopped": result["stopped"], "throughput": throughput,
            **({"weights_digest": result["weights_digest"]} if "weights_digest" in result else {})}


def _throughput(history: list[dict], world: int) -> dict[str, Any]:
    """Samples per second over the run (median over epochs: the first carries the start-up),
    in all and per rank, and the median data-wait share of the slowest rank."""
    ranks = [h.get("rank_samples_per_s") or [h["samples_per_s"]] for h in history]
    per_rank = [round(float(np.median([r[i] for r in ranks])), 2) for i in range(world)] if history else []
    return {"world_size": world, "samples_per_s": round(sum(per_rank), 2), "rank_samples_per_s": per_rank,
            "data_wait_share": round(float(np.median([h["data_wait_share"] for h in history])), 4) if history else 0.0}


def _curve(history: list[dict], path, monitor_label: str) -> None:
    """Training loss and validation metric per epoch, drawn with PIL (no plotting library)."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    epochs = [r["epoch"] for r in history]
    for key, colour in (("train_loss", (200, 40, 40)), ("monitor", (30, 90, 200))):
        values = np.array([r[key] for r in history], dtype=float)
        if len(values) < 1 or not np.isfinite(values).any():
            continue
        lo, hi = np.nanmin(values), np.nanmax(values)
        span = (hi - lo) or 1.0
        pts = [(pad + (e - epochs[0]) / max(1, epochs[-1] - epochs[0]) * (w - 2 * pad),
                h - pad - (v - lo) / span * (h - 2 * pad)) for e, v in zip(epochs, values)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        name = "training loss" if key == "train_loss" else monitor_label
        draw.text((w - pad - 230, h - pad - (40 if key == "train_loss" else 22)),
                  f"{name} ({lo:.3g} .. {hi:.3g})", fill=colour)
    draw.text((w // 2 - 20, h - pad + 10), f"epoch {epochs[0]}..{epochs[-1]}", fill="black")
    location.save_png(img, path)
