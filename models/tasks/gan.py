"""GAN: a generator from a latent vector (MONAI ``Generator``) against a patch discriminator
(MONAI ``PatchDiscriminator``), trained with the non-saturating logistic loss; scored by how
far generated intensity statistics are from the real ones (``stat_distance``), with a grid of
generated samples saved next to the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models import metrics
from models.networks import autocast
from models.tasks.base import Nets, RunData, Task, Update
from voxelflow import location
from voxelflow.errors import SettingError

if TYPE_CHECKING:
    from models.config import TrainConfig


class GAN(Task):
    name = "gan"
    # minus ``stat_distance``: higher is better, as every monitor
    monitor = "monitor"

    @classmethod
    def check(cls, config: TrainConfig) -> None:
        super().check(config)
        levels = len(config.network.channels) - 1
        if any(int(p) % 2 ** levels or int(p) < 2 ** levels for p in config.sampling.patch_size):
            raise SettingError(f"GAN patch size {tuple(config.sampling.patch_size)} must be divisible by "
                               f"{2 ** levels}")

    def networks(self) -> Nets:
        from monai.networks.nets import Generator, PatchDiscriminator

        n, patch = self.config.network, [int(p) for p in self.config.sampling.patch_size]
        channels = tuple(int(c) for c in n.channels)
        levels = len(channels) - 1
        generator = Generator(latent_shape=(n.latent_size,), start_shape=(channels[-1], *[p // 2 ** levels for p in patch]),
                              channels=tuple(reversed(channels[1:-1])) + (1,), strides=(2,) * levels)
        # as many downsampling layers as the smallest patch axis allows (kernel 4 needs >= 4 voxels)
        layers = max(1, min(3, int(np.log2(min(patch))) - 2))
        discriminator = PatchDiscriminator(spatial_dims=3, channels=channels[0], in_channels=1, num_layers_d=layers,
                                           norm="INSTANCE", dropout=n.dropout)
        return {"generator": generator, "discriminator": discriminator}

    def optimizer(self, name: str, net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(net.parameters(), lr=self.config.optimisation.lr, betas=(0.5, 0.999))

    def loss(self, class_weights: torch.Tensor | None) -> nn.Module:
        return nn.BCEWithLogitsLoss()

    def train_step(self, nets: Nets, loss: nn.Module, batch: dict, update: Update,
                   device: torch.device) -> torch.Tensor:
        x = batch["image"].to(device, non_blocking=True)
        g, d = nets["generator"], nets["discriminator"]
        amp = self.config.optimisation.amp
        z = torch.randn(x.shape[0], self.config.network.latent_size, device=device)
        with autocast(device, amp):
            fake = g(z)
            real_logits, fake_logits = d(x)[-1], d(fake.detach())[-1]
            d_loss = 0.5 * (loss(real_logits, torch.ones_like(real_logits)) +
                            loss(fake_logits, torch.zeros_like(fake_logits)))
        update("discriminator", d_loss)
        with autocast(device, amp):
            logits = d(fake)[-1]
            g_loss = loss(logits, torch.ones_like(logits))
        update("generator", g_loss)
        return (d_loss + g_loss).detach()

    def generate(self, generator: nn.Module, n: int, device: torch.device) -> torch.Tensor:
        """``n`` samples from fixed latent vectors (the same every epoch: comparable scores)."""
        gen = torch.Generator().manual_seed(self.config.optimisation.seed)
        z = torch.randn(n, self.config.network.latent_size, generator=gen).to(device)
        with autocast(device, self.config.optimisation.amp):
            return generator(z).float().cpu()

    def validate(self, nets: Nets, batches: list[dict], device: torch.device) -> dict[str, float]:
        real = torch.cat([b["image"] for b in batches])
        out = metrics.generation(real, self.generate(nets["generator"], real.shape[0], device))
        return out | {"monitor": -out["stat_distance"]}

    @torch.no_grad()
    def evaluate(self, data: RunData, nets: Nets, threshold: float | None = None) -> dict[str, Any]:
        from PIL import Image

        generator = nets["generator"].eval()
        real = torch.cat([b["image"] for b in self.test_batches(data)])
        fake = self.generate(generator, real.shape[0], data.device)
        location.save_png(Image.fromarray(sample_grid(fake)), data.folder / "samples.png")
        return metrics.generation(real, fake) | {"samples": int(real.shape[0])}

    def deployed(self, weights: dict[str, dict]) -> nn.Module:
        generator = self.networks()["generator"]
        generator.load_state_dict(weights["generator"])
        return generator

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, self.config.network.latent_size, generator=torch.Generator().manual_seed(0))


def sample_grid(volumes: torch.Tensor, columns: int = 4) -> np.ndarray:
    """Middle slices of ``(N, 1, z, y, x)`` volumes tiled into a uint8 image."""
    slices = [v[0, v.shape[1] // 2].numpy() for v in volumes[: columns * 2]]
    lo, hi = min(float(s.min()) for s in slices), max(float(s.max()) for s in slices)
    tiles = [np.clip((s - lo) / ((hi - lo) or 1.0), 0, 1) for s in slices]
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
