"""The networks voxelflow trains, built from MONAI's implementations.

``build(task, ...)`` returns the model (or, for a GAN, generator and discriminator):

* ``segmentation``: a 3-D residual U-Net (``monai.networks.nets.UNet``);
* ``classification``: a ResNet-10 classifier, 2-D or 3-D (``monai.networks.nets.resnet10``);
  :func:`from_config` makes it 2-D when the patch is one voxel deep (``(1, y, x)``) and wraps it
  in :class:`Planar`, so the 3-D pipeline (patch datasets, sliding windows, inference, export)
  feeds it slices;
* ``autoencoder``: a convolutional autoencoder (``monai.networks.nets.AutoEncoder``) for
  denoising / reconstruction;
* ``gan``: a generator (``monai.networks.nets.Generator``, from a latent vector) and a patch
  discriminator (``monai.networks.nets.PatchDiscriminator``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from voxelflow.errors import SettingError

TASKS = ("segmentation", "classification", "autoencoder", "gan")


def build(task: str, *, in_channels: int = 1, out_channels: int = 2, spatial_dims: int = 3,
          channels: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.1,
          patch_size: Sequence[int] = (32, 64, 64), latent_size: int = 64,
          pooling: str = "avg", norm: str = "batch", stem_stride: int = 1) -> nn.Module | tuple[nn.Module, nn.Module]:
    """Build the network of ``task``.

    Args:
        out_channels: segmentation classes (background included) or classifier classes.
        channels: feature maps per resolution level (the model's size).
        patch_size: the input size (a GAN's generator produces this shape).
        pooling: a classifier's global pooling, ``avg`` or ``max``. Max pooling suits detection
            (is a small finding anywhere in the patch?): an average over the patch dilutes a
            lesion of a hundred voxels among fifty thousand.
        norm: a classifier's normalisation layers, ``batch`` or ``instance``.
        stem_stride: a classifier's first convolution's stride. 2 halves every axis before the
            residual blocks: 8x fewer voxels in 3-D, about 10x the samples/s on a CPU
            (24x48x48 patches, 2 cores: 14 -> 128), and a lesion 4 voxels across is still
            2 voxels across where the first block sees it.
    """
    from monai.networks.nets import AutoEncoder, Generator, PatchDiscriminator, UNet, resnet10

    channels = tuple(int(c) for c in channels)
    strides = (2,) * (len(channels) - 1)
    if task == "segmentation":
        return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                    channels=channels, strides=strides, num_res_units=2, norm="INSTANCE", dropout=dropout)
    if task == "classification":
        # a quarter of ResNet-10's width: 0.9 M parameters, enough for CT volumes and fast on CPU;
        # a 3-voxel stem without max-pool, and without stride unless ``stem_stride`` asks for
        # one: MONAI's 7-voxel stride-2 stem and pool blur away lesions a few voxels across
        # before the first residual block sees them.
        net = resnet10(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=out_channels,
                       feed_forward=True, widen_factor=0.25, conv1_t_size=3, conv1_t_stride=int(stem_stride), no_max_pool=True,
                       norm=("instance", {"affine": True}) if norm == "instance" else norm)
        if pooling == "max":
            net.avgpool = (nn.AdaptiveMaxPool3d if spatial_dims == 3 else nn.AdaptiveMaxPool2d)(1)
        elif pooling != "avg":
            raise SettingError(f"pooling must be 'avg' or 'max', not {pooling!r}")
        return net
    if task == "autoencoder":
        return AutoEncoder(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=in_channels,
                           channels=channels[:-1], strides=strides, num_res_units=1, dropout=dropout)
    if task == "gan":
        levels = len(channels) - 1
        start = [int(s) // 2 ** levels for s in patch_size]
        if any(s < 1 or s * 2 ** levels != int(p) for s, p in zip(start, patch_size)):
            raise SettingError(f"GAN patch size {tuple(patch_size)} must be divisible by {2 ** levels}")
        generator = Generator(latent_shape=(latent_size,), start_shape=(channels[-1], *start),
                              channels=tuple(reversed(channels[1:-1])) + (in_channels,), strides=(2,) * levels)
        # as many downsampling layers as the smallest patch axis allows (kernel 4 needs >= 4 voxels)
        layers = max(1, min(3, int(np.log2(min(int(p) for p in patch_size))) - 2))
        discriminator = PatchDiscriminator(spatial_dims=spatial_dims, channels=channels[0], in_channels=in_channels,
                                           num_layers_d=layers, norm="INSTANCE", dropout=dropout)
        return generator, discriminator
    raise SettingError(f"unknown task {task!r}; expected one of {TASKS}")


class Planar(nn.Module):
    """A 2-D network on depth-1 3-D patches: ``(B, C, 1, y, x)`` in, the 2-D network's output
    out. A slice classifier then trains on ZarrPatchDataset patches and slides over volumes
    like a 3-D one (windows one slice deep)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[2] != 1:
            raise ValueError(f"a planar network takes (batch, channels, 1, y, x) patches, not {tuple(x.shape)}")
        return self.net(x[:, :, 0])


def is_planar(patch_size: Sequence[int]) -> bool:
    """A patch one voxel deep: the classifier is 2-D."""
    return int(patch_size[0]) == 1


def from_config(config, out_channels: int = 2) -> nn.Module | tuple[nn.Module, nn.Module]:
    """The network a :class:`models.train.TrainConfig` describes; a classifier on patches one
    voxel deep is a 2-D network wrapped in :class:`Planar`."""
    planar = config.task == "classification" and is_planar(config.patch_size)
    net = build(config.task, out_channels=out_channels, channels=config.channels, dropout=config.dropout,
                patch_size=config.patch_size, latent_size=config.latent_size, spatial_dims=2 if planar else 3,
                pooling=getattr(config, "pooling", "avg"), norm=getattr(config, "norm", "batch"),
                stem_stride=getattr(config, "stem_stride", 1))
    return Planar(net) if planar else net


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA (bf16 where supported), a no-op elsewhere."""
    if device.type != "cuda" or not enabled:
        return torch.autocast(device_type="cpu", enabled=False)
    return torch.autocast(device_type="cuda", dtype=amp_dtype())


def amp_dtype() -> torch.dtype:
    """The autocast dtype on this machine's GPU: bf16 where supported, else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A loss scaler for mixed precision, enabled only where it is needed: fp16 autocast.
    bf16 has float32's exponent range (gradients do not underflow), and an enabled scaler
    costs every step an unscale pass and a device-to-host sync (``step`` reads its inf
    check), which in a launch-bound step is most of what AMP could save. Its state is empty
    when disabled (as on a CPU); a checkpoint's scale loads into an enabled one."""
    return torch.amp.GradScaler("cuda", enabled=enabled and device.type == "cuda" and amp_dtype() == torch.float16)


@contextlib.contextmanager
def tuned_kernels(device: torch.device, enabled: bool = True):
    """cuDNN autotuning (``torch.backends.cudnn.benchmark``) for the length of the block on
    CUDA when ``enabled``: each convolution shape's fastest algorithm is timed once and reused
    (a patch loop and a sliding window see a handful of shapes). Left off where deterministic
    kernels are asked for (``torch.use_deterministic_algorithms`` or ``cudnn.deterministic``):
    autotuning may pick another algorithm from run to run. The previous setting is restored
    after."""
    if not enabled or device.type != "cuda" or torch.backends.cudnn.deterministic \
            or torch.are_deterministic_algorithms_enabled():
        yield
        return
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old
