"""Data-parallel training ranks joined with ``torch.distributed``: NCCL on CUDA, gloo on CPU.

A rank is one process (a Dask worker, a GPU each when there are GPUs) taking part in one
training run; ``Ranks`` says which one it is and where they meet. Every collective has a
timeout: a rank that is lost (its process killed, its machine gone) makes the others fail with
``RankLostError`` within ``timeout_s`` instead of waiting forever. Plain PyTorch: which worker
runs which rank is the orchestrator's business (``flows/train.py``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from voxelflow.errors import VoxelflowError


class RankLostError(VoxelflowError, RuntimeError):
    """A rank of a data-parallel run stopped answering (or failed) while the others waited."""


class RanksDivergedError(VoxelflowError, RuntimeError):
    """The ranks of a data-parallel run ended with different weights."""


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    init_method: str  # ``tcp://host:port`` of rank 0's rendezvous
    timeout_s: float = 600.0  # longest wait of a collective: covers rank 0's whole-volume validation

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Ranks(0, 1, "")


def free_port() -> int:
    """A TCP port free on this machine now (rank 0's rendezvous; run on rank 0's host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def joined(ranks: Ranks, device: torch.device):
    """The process group of ``ranks`` for the duration of the block (nothing for one rank)."""
    if ranks.world == 1:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # NCCL errors and timeouts abort the communicator and raise, rather than hang a stream
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    try:
        dist.init_process_group(backend, init_method=ranks.init_method, rank=ranks.rank, world_size=ranks.world,
                                timeout=timedelta(seconds=ranks.timeout_s))
    except Exception as exc:  # noqa: BLE001 - every failure to meet is the same fact for the user
        raise RankLostError(f"rank {ranks.rank} of {ranks.world}: the ranks did not all meet at "
                            f"{ranks.init_method} within {ranks.timeout_s:.0f} s ({type(exc).__name__}: {exc})") from exc
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a broken group cannot always be torn down cleanly
            dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _collective(what: str):
    """A collective's failure (a peer gone, a timeout) as a ``RankLostError``."""
    try:
        yield
    except RankLostError:
        raise
    except (RuntimeError, OSError) as exc:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise RankLostError(f"rank {rank}: {what} failed, another rank is gone or stopped answering "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def weights_digest(nets: dict[str, nn.Module]) -> str:
    """A digest of the networks' parameters and buffers (equal on ranks that stayed in step)."""
    import hashlib

    h = hashlib.sha256()
    for name, net in sorted(nets.items()):
        for key, value in net.state_dict().items():
            h.update(f"{name}.{key}".encode())
            h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` under ``DistributedDataParallel`` (its gradients averaged over the ranks in each
    backward pass), or ``net`` itself for one rank."""
    if not _active():
        return net
    from torch.nn.parallel import DistributedDataParallel

    with _collective("broadcasting the initial weights"):
        return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast(obj: Any, what: str) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    with _collective(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, what: str) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with _collective(what):
        dist.all_gather_object(out, obj)
    return out


def barrier(what: str) -> None:
    if _active():
        with _collective(what):
            # a one-element all-reduce: alike on gloo and NCCL (whose barrier has to guess the device)
            dist.all_reduce(torch.zeros(1, device="cuda" if dist.get_backend() == "nccl" else "cpu"))
