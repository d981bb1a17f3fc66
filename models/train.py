"""Training loops for every task, with checkpoints that make a killed run resumable.

``fit(config, train_data, val_data, out_dir, ...)`` trains one model:

* AdamW (Adam for the GAN), weight decay, dropout, cosine learning-rate schedule;
* optional mixed precision on CUDA (bf16 where supported; a loss scaler only for fp16) and
  cuDNN autotuning (both off by default: slower for the default U-Net, see ``TrainConfig``);
  the loss read once per epoch (no wait for the GPU per step);
* class-imbalance weights for the losses (inverse class frequency or its square root; off by
  default for segmentation, whose Dice term already balances classes);
* validation every epoch, early stopping on the task's metric (segmentation: mean foreground
  Dice; classification: macro F1; autoencoder: PSNR; GAN: minus the distance between real and
  generated intensity statistics);
* a checkpoint every epoch (``checkpoint.pt``: weights, optimiser, schedule, scaler, RNG state,
  history), written aside and renamed; calling ``fit`` again resumes after the last completed
  epoch and ends with the weights an uninterrupted run would have.

Plain PyTorch + MONAI losses and metrics: no Prefect here.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.networks import autocast, from_config, grad_scaler, tuned_kernels
from voxelflow import location
from voxelflow.data import make_loader


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    task: Literal["segmentation", "classification", "autoencoder", "gan"] = "segmentation"
    # (z, y, x) voxels; a classifier's patch one voxel deep, (1, y, x), makes it a 2-D slice
    # classifier (models.networks.Planar), which sees ~10x the patches per second of a 3-D one
    patch_size: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 2
    epochs: int = 20
    steps_per_epoch: int = 25
    val_steps: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    # Mixed precision (bf16 autocast on CUDA; no effect on a CPU). Off by default: a small
    # network's step waits on kernel launches, not on convolutions that already run in TF32, so
    # autocast only adds cast kernels (bench/train.py; figures in the README, "Training and
    # inference"). Turn it on for wide networks or large patches, where the step is compute-bound.
    amp: bool = False
    # cuDNN autotuning (``torch.backends.cudnn.benchmark``) of the convolutions on CUDA, unless
    # deterministic kernels are asked for. Off by default for the same reason as ``amp``: the
    # kernels it picks are faster alone, but a small step waits on launches (bench/train.py;
    # README). Inference (models.infer), with larger batches of windows, turns it on.
    cudnn_benchmark: bool = False
    # "inverse" (inverse class frequency), "sqrt" (its square root) or "none"; default: none for
    # segmentation (the Dice term already balances classes, and inverse weights on top of it
    # stalled training on the synthetic archive: README), inverse for classification.
    class_weighting: Literal["none", "sqrt", "inverse"] | None = None
    early_stopping: int = 5
    seed: int = 0
    num_workers: int = 0
    # decoded chunks each data-loading process keeps (ZarrPatchDataset ``cache_mb``): patches
    # drawn again from the same volumes decode nothing twice (README: the patch read time it
    # saves); per loader worker
    cache_mb: float = Field(512, ge=0)
    latent_size: int = 64
    keep_largest: tuple[int, ...] = ()  # segmentation post-processing: classes kept as one component
    # segmentation: label values merged before training and evaluation, {from: to}; e.g. {2: 1}
    # makes a liver model of a liver (1) + lesion (2) label map, lesions counted as liver as
    # in LiTS's liver task (values not named keep theirs; classes are 0..largest value after)
    label_map: dict[int, int] = {}
    denoise_std: float = 0.1  # autoencoder input noise, in units of the image's std
    # Binary classification as detection: ``positive_class`` is the class a volume has when any
    # window of it shows it (volume probability = the largest window probability); with
    # ``positive_label`` a training patch's target comes from the segmentation (positive when it
    # holds at least ``min_positive_voxels`` voxels of that label value), not from the volume's
    # class, which a patch that misses the lesion would contradict.
    positive_class: str | None = None
    positive_label: int | None = None
    min_positive_voxels: int = 8
    # with ``positive_label``: the share of training patches centred on a voxel of that label
    # (the rest: class-balanced volumes, half of them on an organ); lesions are a sliver of the
    # volume, and a classifier that sees them in 1 patch in 6 learns the prior, not the lesion
    positive_share: float = Field(0.5, ge=0.0, le=1.0)
    # a classifier's global pooling: "max" for detection (a small finding anywhere in the patch)
    pooling: Literal["avg", "max"] = "avg"
    # a classifier's normalisation: "instance" keeps its output for windows unlike the training
    # batches (inference slides over the whole volume) from shifting with batch statistics
    norm: Literal["batch", "instance"] = "batch"
    # a classifier's first convolution's stride (see ``models.networks.build``)
    stem_stride: int = Field(1, ge=1, le=4)


    @model_validator(mode="after")
    def _label_map_only_for_segmentation(self):
        if self.label_map and self.task != "segmentation":
            raise ValueError(f"label_map merges segmentation classes; a {self.task} model takes none")
        if any(k < 0 or v < 0 for k, v in self.label_map.items()):
            raise ValueError(f"label_map values must be >= 0: {self.label_map}")
        return self

    @model_validator(mode="after")
    def _planar_only_for_classifiers(self):
        if self.task != "classification" and int(self.patch_size[0]) == 1:
            raise ValueError(f"patches one voxel deep (2-D) are for classifiers, not {self.task}: "
                             f"patch_size {tuple(self.patch_size)}")
        return self


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _class_weights(counts: dict[int, int], n: int, mode: str = "inverse") -> torch.Tensor:
    """Inverse-frequency (or its square root) weights, normalised to mean 1 (missing classes
    count as the rarest)."""
    freq = np.array([counts.get(i, 0) for i in range(n)], dtype=np.float64)
    freq = np.where(freq > 0, freq, freq[freq > 0].min() if (freq > 0).any() else 1.0)
    w = 1.0 / (np.sqrt(freq) if mode == "sqrt" else freq)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def weighting(config: TrainConfig) -> str:
    if config.class_weighting is not None:
        return config.class_weighting
    return "inverse" if config.task == "classification" else "none"


class _Task:
    """What differs between tasks: models, losses, the step and the validation metric."""

    def __init__(self, config: TrainConfig, num_classes: int, class_weights: torch.Tensor | None,
                 device: torch.device):
        from monai.losses import DiceCELoss

        self.c, self.device = config, device
        self.num_classes = num_classes
        kind = config.task
        if kind == "gan":
            g, d = from_config(config)
            self.models = {"generator": g.to(device), "discriminator": d.to(device)}
            self.optimizers = {k: torch.optim.Adam(m.parameters(), lr=config.lr, betas=(0.5, 0.999))
                               for k, m in self.models.items()}
        else:
            model = from_config(config, num_classes)
            self.models = {"model": model.to(device)}
            self.optimizers = {"model": torch.optim.AdamW(model.parameters(), lr=config.lr,
                                                          weight_decay=config.weight_decay)}
        self.schedulers = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(1, config.epochs))
                           for k, o in self.optimizers.items()}
        # a loss scaler only for fp16 autocast (bf16 needs none; see networks.grad_scaler)
        self.scaler = grad_scaler(device, config.amp)
        w = class_weights.to(device) if class_weights is not None else None
        if kind == "segmentation":
            self.loss = DiceCELoss(to_onehot_y=True, softmax=True, weight=w)
        elif kind == "classification":
            self.loss = nn.CrossEntropyLoss(weight=w)
        elif kind == "autoencoder":
            self.loss = nn.MSELoss()
        else:
            self.loss = nn.BCEWithLogitsLoss()

    def _backward(self, name: str, loss: torch.Tensor) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()

    def train_step(self, batch: dict) -> torch.Tensor | float:
        """One optimisation step. Returns the loss as a device tensor (reading it would make
        the host wait for the GPU every step; ``fit`` reads an epoch's losses at its end), or
        NaN for a classification batch without a usable target."""
        c, dev = self.c, self.device
        amp = autocast(dev, c.amp)
        if c.task == "classification":
            keep = batch["class"] >= 0  # on the host: no wait for the device to decide
            if not keep.any():
                return float("nan")
            x, y = batch["image"], batch["class"]
            if not keep.all():
                x, y = x[keep], y[keep]
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with amp:
                loss = self.loss(self.models["model"](x), y)
            self._backward("model", loss)
            return loss.detach()
        x = batch["image"].to(dev, non_blocking=True)
        if c.task == "segmentation":
            with amp:
                loss = self.loss(self.models["model"](x), batch["label"].to(dev, non_blocking=True))
            self._backward("model", loss)
        elif c.task == "autoencoder":
            noisy = x + torch.randn_like(x) * c.denoise_std * x.std()
            with amp:
                loss = self.loss(self.models["model"](noisy), x)
            self._backward("model", loss)
        else:
            g, d = self.models["generator"], self.models["discriminator"]
            z = torch.randn(x.shape[0], c.latent_size, device=dev)
            with amp:
                fake = g(z)
                real_logits, fake_logits = d(x)[-1], d(fake.detach())[-1]
                d_loss = 0.5 * (self.loss(real_logits, torch.ones_like(real_logits)) +
                                self.loss(fake_logits, torch.zeros_like(fake_logits)))
            self._backward("discriminator", d_loss)
            with amp:
                logits = d(fake)[-1]
                g_loss = self.loss(logits, torch.ones_like(logits))
            self._backward("generator", g_loss)
            loss = d_loss + g_loss
        return loss.detach()

    @torch.no_grad()
    def validate_with(self, validator) -> dict[str, float]:
        for m in self.models.values():
            m.eval()
        try:
            return validator(self.models)
        finally:
            for m in self.models.values():
                m.train()

    @torch.no_grad()
    def validate(self, batches: list[dict]) -> dict[str, float]:
        from monai.metrics import DiceMetric

        c, dev = self.c, self.device
        for m in self.models.values():
            m.eval()
        try:
            if c.task == "segmentation":
                metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
                for b in batches:
                    with autocast(dev, c.amp):
                        pred = self.models["model"](b["image"].to(dev)).argmax(1, keepdim=True)
                    onehot = lambda t: torch.nn.functional.one_hot(t[:, 0].long(), self.num_classes).movedim(-1, 1)  # noqa: E731
                    metric(onehot(pred.cpu()), onehot(b["label"]))
                value = metric.aggregate().item()
                return {"dice": 0.0 if math.isnan(value) else value, "monitor": 0.0 if math.isnan(value) else value}
            if c.task == "classification":
                ys, ps = [], []
                for b in batches:
                    keep = b["class"] >= 0
                    if keep.any():
                        with autocast(dev, c.amp):
                            ps.append(self.models["model"](b["image"][keep].to(dev)).argmax(1).cpu())
                        ys.append(b["class"][keep])
                y, p = torch.cat(ys), torch.cat(ps)
                f1s = []
                for k in range(self.num_classes):
                    tp = int(((p == k) & (y == k)).sum())
                    prec = tp / max(1, int((p == k).sum()))
                    rec = tp / max(1, int((y == k).sum()))
                    f1s.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
                acc = float((p == y).float().mean())
                return {"accuracy": acc, "f1": float(np.mean(f1s)), "monitor": float(np.mean(f1s))}
            if c.task == "autoencoder":
                mse, rng = [], []
                for b in batches:
                    x = b["image"].to(dev)
                    with autocast(dev, c.amp):
                        r = self.models["model"](x).float()
                    mse.append(float(((r - x) ** 2).mean()))
                    rng.append(float(x.max() - x.min()))
                psnr = float(np.mean([10 * math.log10(max(r, 1e-6) ** 2 / max(m, 1e-12)) for m, r in zip(mse, rng)]))
                return {"psnr": psnr, "monitor": psnr}
            real = torch.cat([b["image"] for b in batches])
            gen = torch.Generator().manual_seed(c.seed)
            z = torch.randn(real.shape[0], c.latent_size, generator=gen).to(dev)
            with autocast(dev, c.amp):
                fake = self.models["generator"](z).float().cpu()
            dist = abs(float(fake.mean() - real.mean())) + abs(float(fake.std() - real.std()))
            return {"stat_distance": dist, "fake_mean": float(fake.mean()), "fake_std": float(fake.std()),
                    "monitor": -dist}
        finally:
            for m in self.models.values():
                m.train()

    def state(self) -> dict[str, Any]:
        return {"models": {k: m.state_dict() for k, m in self.models.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        for k, m in self.models.items():
            m.load_state_dict(state["models"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if state["scaler"]:  # empty from a disabled scaler (CPU, no AMP): a run moved to a GPU starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])


def _save_atomic(obj: Any, path: Path) -> None:
    location.torch_save(obj, path)


def fit(config: TrainConfig, train_data, val_data, out_dir: str | os.PathLike, *, num_classes: int = 2,
        class_counts: dict[int, int] | None = None, device: torch.device | None = None,
        stop_after: int | None = None, on_epoch=None, validator=None) -> dict[str, Any]:
    """Train (or resume training) and return ``{"history", "best_epoch", "best", "stopped"}``.

    Args:
        train_data, val_data: patch datasets (``set_epoch`` is called if they have it).
        out_dir: holds ``checkpoint.pt`` (every epoch) and ``best.pt`` (best validation).
        class_counts: label value -> count, for class-imbalance weights.
        stop_after: end after this epoch as if killed (for tests of resumption).
        on_epoch: called with each epoch's history row (metrics artifacts, progress).
        validator: ``validator(models) -> metrics`` (with a ``"monitor"`` key) replaces the
            validation on ``val_data`` patches, e.g. whole-volume sliding-window Dice.

    With ``config.cudnn_benchmark`` cuDNN autotunes the convolutions on CUDA (unless
    deterministic kernels are asked for: ``networks.tuned_kernels``).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tuned_kernels(device, config.cudnn_benchmark):
        return _fit(config, train_data, val_data, out_dir, num_classes=num_classes, class_counts=class_counts,
                    device=device, stop_after=stop_after, on_epoch=on_epoch, validator=validator)


def _fit(config: TrainConfig, train_data, val_data, out_dir, *, num_classes: int, class_counts, device: torch.device,
         stop_after: int | None, on_epoch, validator) -> dict[str, Any]:

    out = location.path(out_dir)
    location.makedirs(out)
    _seed_everything(config.seed)
    mode = weighting(config)
    weights = _class_weights(class_counts, num_classes, mode) if (mode != "none" and class_counts and config.task in
                                                                  ("segmentation", "classification")) else None
    task = _Task(config, num_classes, weights, device)
    state = {"epoch": 0, "history": [], "best": -math.inf, "best_epoch": 0, "bad_epochs": 0}
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        saved = location.torch_load(ckpt, map_location=device, weights_only=False)
        task.load(saved["task"])
        # RNG states are CPU byte tensors on every device; map_location moved them to ``device``
        torch.set_rng_state(saved["rng"]["torch"].cpu())
        if device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"].cpu())
        state = saved["state"]
    val_batches = None
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if state["bad_epochs"] >= config.early_stopping:
            break
        for ds in (train_data, val_data):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
        loader = make_loader(train_data, batch_size=config.batch_size, num_workers=config.num_workers)
        t0 = time.perf_counter()
        wait = 0.0
        losses = []
        it = iter(loader)
        for _ in range(config.steps_per_epoch):
            tw = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            wait += time.perf_counter() - tw
            losses.append(task.train_step(batch))
        # read the losses once the epoch's steps are queued: one wait for the GPU per epoch
        # (and the epoch's time includes the GPU's work), not one per step
        losses = [float(v) for v in losses]
        for s in task.schedulers.values():
            s.step()
        train_s = time.perf_counter() - t0
        if validator is not None:
            metrics = task.validate_with(validator)
        else:
            if val_batches is None or hasattr(val_data, "set_epoch"):
                vloader = make_loader(val_data, batch_size=config.batch_size, num_workers=0)
                val_batches = [b for b, _ in zip(vloader, range(config.val_steps))]
            metrics = task.validate(val_batches)
        row = {"epoch": epoch, "train_loss": float(np.nanmean(losses)), **metrics,
               "lr": float(next(iter(task.optimizers.values())).param_groups[0]["lr"]),
               "seconds": round(train_s, 3), "samples_per_s": round(config.steps_per_epoch * config.batch_size / train_s, 2),
               "data_wait_share": round(wait / train_s, 4)}
        state["history"].append(row)
        if metrics["monitor"] > state["best"]:
            state["best"], state["best_epoch"], state["bad_epochs"] = metrics["monitor"], epoch, 0
            _save_atomic({k: m.state_dict() for k, m in task.models.items()}, out / "best.pt")
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        _save_atomic({"task": task.state(), "state": state, "config": config.model_dump(),
                      "rng": {"torch": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}, ckpt)
        if on_epoch:
            on_epoch(row)
        if stop_after is not None and epoch >= stop_after:
            return {"history": state["history"], "best_epoch": state["best_epoch"], "best": state["best"],
                    "stopped": "interrupted"}
    return {"history": state["history"], "best_epoch": state["best_epoch"], "best": state["best"],
            "stopped": "early" if state["bad_epochs"] >= config.early_stopping else "completed",
            "models": task.models}
