"""The training loop every task shares, with checkpoints that make a killed run resumable.

``fit(config, train_data, val_data, out_dir, ...)`` trains one model of ``config.task`` (the
task, ``models.tasks``, supplies its networks, optimisers, loss, step and validation):

* the task's optimisers (AdamW; Adam for the GAN) with a cosine learning-rate schedule;
* optional mixed precision on CUDA (bf16 where supported; a loss scaler only for fp16) and
  cuDNN autotuning (both off by default: see ``OptimisationConfig``); the loss read once per
  epoch (no wait for the GPU per step);
* class-imbalance weights for the loss (inverse class frequency or its square root);
* validation every epoch, early stopping on the task's monitor;
* a checkpoint every epoch (``checkpoint.pt``: weights, optimiser, schedule, scaler, RNG state,
  history), written aside and renamed; calling ``fit`` again resumes after the last completed
  epoch and ends with the weights an uninterrupted run would have;
* data-parallel over ``ranks`` (``models.distributed``): each rank trains on its own share of
  the patches under ``DistributedDataParallel`` (gradients averaged over the ranks); rank 0
  validates, decides early stopping for all and writes the checkpoints (with every rank's RNG
  state, so a resumed run continues as the uninterrupted one).

Plain PyTorch: no Prefect here.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch

from models import distributed
from models.config import TrainConfig
from models.distributed import SINGLE, Ranks
from models.networks import grad_scaler, tuned_kernels
from models.tasks import Task, class_weights, task_for
from voxelflow import location
from voxelflow.data import make_loader

__all__ = ["TrainConfig", "fit", "weighting"]


def _seed_everything(seed: int, rank: int = 0) -> None:
    # other ranks draw other noise (a GAN's latent vectors, dropout masks); rank 0 draws what a
    # single-process run draws. Initial weights are rank 0's on every rank (DDP broadcasts them).
    if rank:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def weighting(config: TrainConfig) -> str:
    """The class weighting of ``config``'s loss: its own, else its task's default."""
    return task_for(config).weighting()


class _Training:
    """The state of one training: the task's networks with their optimisers, schedules and loss
    scaler, on ``device``. Training steps go through ``stepped`` (the networks under DDP when
    there are several ranks); validation and checkpoints use ``models`` themselves."""

    def __init__(self, task: Task, weights: torch.Tensor | None, device: torch.device):
        c = task.config
        self.task, self.device = task, device
        self.models = {k: m.to(device) for k, m in task.networks().items()}
        self.stepped = {k: distributed.wrap(m, device) for k, m in self.models.items()}
        self.optimizers = {k: task.optimizer(k, m) for k, m in self.models.items()}
        self.schedulers = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(1, c.optimisation.epochs))
                           for k, o in self.optimizers.items()}
        # a loss scaler only for fp16 autocast (bf16 needs none; see networks.grad_scaler)
        self.scaler = grad_scaler(device, c.optimisation.amp)
        self.loss = task.loss(weights.to(device) if weights is not None else None)

    def _update(self, name: str, loss: torch.Tensor) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()

    def train_step(self, batch: dict) -> torch.Tensor | float:
        return self.task.train_step(self.stepped, self.loss, batch, self._update, self.device)

    @torch.no_grad()
    def validate(self, validator=None, batches: list[dict] | None = None) -> dict[str, float]:
        """``validator(models)`` (whole volumes), else the task's validation of ``batches``."""
        for m in self.models.values():
            m.eval()
        try:
            return validator(self.models) if validator is not None else \
                self.task.validate(self.models, batches, self.device)
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


def fit(config: TrainConfig, train_data, val_data, out_dir: str | os.PathLike, *, num_classes: int = 2,
        class_counts: dict[int, int] | None = None, device: torch.device | None = None,
        stop_after: int | None = None, on_epoch=None, validator=None, ranks: Ranks = SINGLE) -> dict[str, Any]:
    """Train (or resume training) and return ``{"history", "best_epoch", "best", "stopped"}``.

    Args:
        train_data, val_data: patch datasets (``set_epoch`` is called if they have it).
        out_dir: holds ``checkpoint.pt`` (every epoch) and ``best.pt`` (best validation).
        class_counts: label value -> count, for class-imbalance weights.
        stop_after: end after this epoch as if killed (for tests of resumption).
        on_epoch: called with each epoch's history row (metrics artifacts, progress).
        validator: ``validator(models) -> metrics`` (with a ``"monitor"`` key) replaces the
            validation on ``val_data`` patches, e.g. whole-volume sliding-window Dice.
        ranks: this process's rank of a data-parallel run, its process group joined
            (``distributed.joined``); every rank calls ``fit`` with the same arguments.

    With ``config.optimisation.cudnn_benchmark`` cuDNN autotunes the convolutions on CUDA (unless
    deterministic kernels are asked for: ``networks.tuned_kernels``).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tuned_kernels(device, config.optimisation.cudnn_benchmark):
        return _fit(config, train_data, val_data, out_dir, num_classes=num_classes, class_counts=class_counts,
                    device=device, stop_after=stop_after, on_epoch=on_epoch, validator=validator, ranks=ranks)


def _fit(config: TrainConfig, train_data, val_data, out_dir, *, num_classes: int, class_counts, device: torch.device,
         stop_after: int | None, on_epoch, validator, ranks: Ranks) -> dict[str, Any]:

    out = location.path(out_dir)
    location.makedirs(out)
    o, s = config.optimisation, config.sampling
    _seed_everything(o.seed, ranks.rank)
    if ranks.world > 1:
        train_data = train_data.shard(ranks.rank, ranks.world)
    task = task_for(config, num_classes)
    mode = task.weighting()
    weights = class_weights(class_counts, num_classes, mode) if mode != "none" and class_counts else None
    training = _Training(task, weights, device)
    state = {"epoch": 0, "history": [], "best": -math.inf, "best_epoch": 0, "bad_epochs": 0}
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        saved = location.torch_load(ckpt, map_location=device, weights_only=False)
        training.load(saved["task"])
        rng = saved["rank_rng"][ranks.rank] if ranks.world > 1 else saved["rng"]
        # RNG states are CPU byte tensors on every device; map_location moved them to ``device``
        torch.set_rng_state(rng["torch"].cpu())
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu())
        state = saved["state"]
    val_batches = None
    for epoch in range(state["epoch"] + 1, o.epochs + 1):
        if state["bad_epochs"] >= o.early_stopping:
            break
        for ds in (train_data, val_data):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
        loader = make_loader(train_data, batch_size=s.batch_size, num_workers=s.num_workers)
        t0 = time.perf_counter()
        wait = 0.0
        losses = []
        it = iter(loader)
        for _ in range(s.steps_per_epoch):
            tw = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            wait += time.perf_counter() - tw
            losses.append(training.train_step(batch))
        # read the losses once the epoch's steps are queued: one wait for the GPU per epoch
        # (and the epoch's time includes the GPU's work), not one per step
        losses = [float(v) for v in losses]
        for schedule in training.schedulers.values():
            schedule.step()
        train_s = time.perf_counter() - t0
        metrics = None
        if ranks.main:
            if validator is None and (val_batches is None or hasattr(val_data, "set_epoch")):
                vloader = make_loader(val_data, batch_size=s.batch_size, num_workers=0)
                val_batches = [b for b, _ in zip(vloader, range(s.val_steps))]
            metrics = training.validate(validator, val_batches)
        metrics = distributed.broadcast(metrics, f"epoch {epoch}'s validation")
        rates = distributed.gather((s.steps_per_epoch * s.batch_size / train_s, wait / train_s, float(np.nanmean(losses)),
                                    train_s), f"epoch {epoch}'s throughput")
        row = {"epoch": epoch, "train_loss": float(np.nanmean([r[2] for r in rates])), **metrics,
               "lr": float(next(iter(training.optimizers.values())).param_groups[0]["lr"]),
               "seconds": round(max(r[3] for r in rates), 3), "samples_per_s": round(sum(r[0] for r in rates), 2),
               # the slowest rank's: every step waits for it
               "data_wait_share": round(max(r[1] for r in rates), 4)}
        if ranks.world > 1:
            row |= {"world_size": ranks.world, "rank_samples_per_s": [round(r[0], 2) for r in rates]}
        state["history"].append(row)
        better = metrics["monitor"] > state["best"]
        if better:
            state["best"], state["best_epoch"], state["bad_epochs"] = metrics["monitor"], epoch, 0
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        rng = distributed.gather({"torch": torch.get_rng_state(),
                                  "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                                 f"epoch {epoch}'s random state")
        if ranks.main:
            if better:
                location.torch_save({k: m.state_dict() for k, m in training.models.items()}, out / "best.pt")
            location.torch_save({"task": training.state(), "state": state, "config": config.model_dump(),
                                 "rng": rng[0], **({"rank_rng": rng} if ranks.world > 1 else {})}, ckpt)
        if on_epoch:
            on_epoch(row)
        if stop_after is not None and epoch >= stop_after:
            return _ended(training, state, "interrupted", ranks)
    return _ended(training, state, "early" if state["bad_epochs"] >= o.early_stopping else "completed", ranks)


def _ended(training: _Training, state: dict, stopped: str, ranks: Ranks) -> dict[str, Any]:
    """``fit``'s result; with several ranks, after checking they all hold the same weights."""
    out = {"history": state["history"], "best_epoch": state["best_epoch"], "best": state["best"],
           "stopped": stopped, "models": training.models}
    if ranks.world > 1:
        digests = distributed.gather(distributed.weights_digest(training.models), "comparing the final weights")
        if len(set(digests)) > 1:
            raise distributed.RanksDivergedError(
                f"the {ranks.world} ranks ended with different weights (digests {digests}): a rank's "
                "gradients were not averaged with the others'; the run is not registered")
        out["weights_digest"] = digests[ranks.rank]
    return out
