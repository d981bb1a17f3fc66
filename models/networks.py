"""What every network voxelflow trains shares: the 2-D-on-3-D wrapper (``Planar``), mixed
precision (``autocast``, ``grad_scaler``) and cuDNN autotuning (``tuned_kernels``). Each task's
networks are built by the task (``models.tasks``), from MONAI's implementations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn


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
