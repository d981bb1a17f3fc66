"""Autoencoder: a convolutional denoising autoencoder (MONAI ``AutoEncoder``) that reconstructs
patches from noisy copies, scored by PSNR and SSIM of the reconstructions. Learns from images
alone, labelled or not."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from models import metrics
from models.networks import autocast
from models.tasks.base import Nets, RunData, Task, Update


class Autoencoder(Task):
    name = "autoencoder"
    monitor = "psnr"

    def networks(self) -> Nets:
        from monai.networks.nets import AutoEncoder

        n = self.config.network
        channels = tuple(int(c) for c in n.channels)
        return {"model": AutoEncoder(spatial_dims=3, in_channels=1, out_channels=1, channels=channels[:-1],
                                     strides=(2,) * (len(channels) - 1), num_res_units=1, dropout=n.dropout)}

    def loss(self, class_weights: torch.Tensor | None) -> nn.Module:
        return nn.MSELoss()

    def train_step(self, nets: Nets, loss: nn.Module, batch: dict, update: Update,
                   device: torch.device) -> torch.Tensor:
        x = batch["image"].to(device, non_blocking=True)
        noisy = x + torch.randn_like(x) * self.config.optimisation.denoise_std * x.std()
        with autocast(device, self.config.optimisation.amp):
            value = loss(nets["model"](noisy), x)
        update("model", value)
        return value.detach()

    def _score(self, net: nn.Module, batches: list[dict], device: torch.device) -> dict[str, float]:
        rows = []
        for b in batches:
            x = b["image"].to(device)
            with autocast(device, self.config.optimisation.amp):
                rows.append(metrics.reconstruction(net(x).float(), x))
        return {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim")}

    def validate(self, nets: Nets, batches: list[dict], device: torch.device) -> dict[str, float]:
        out = self._score(nets["model"], batches, device)
        return out | {"monitor": out["psnr"]}

    @torch.no_grad()
    def evaluate(self, data: RunData, nets: Nets, threshold: float | None = None) -> dict[str, Any]:
        nets["model"].eval()
        batches = self.test_batches(data)
        return self._score(nets["model"], batches, data.device) | {"samples": len(batches)}
