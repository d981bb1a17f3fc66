"""The plan's memory estimate (``models.plan.estimate_bytes``) against a real training step's
peak, for U-Nets of several patch sizes, in one run.

    .venv/bin/python bench/plan_memory.py
    .venv/bin/python bench/plan_memory.py --patches 32,64,64 64,96,96 96,128,128 --channels 32,64,128,256

Each configuration runs in a fresh process: two AdamW steps of Dice + cross-entropy on random
batches. Measured: on CUDA ``torch.cuda.max_memory_allocated`` (what the caching allocator
handed out at the peak), on a CPU the growth of the process's peak resident memory over the
step. Printed: the estimate, the measured peak, their ratio, and the activations autograd saved
(the meta-device count ``ACTIVATION_PEAK`` multiplies).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(patch: list[int], batch: int, channels: list[int], classes: int) -> dict:
    import psutil
    import torch
    from monai.losses import DiceCELoss

    from models.config import TrainConfig
    from models.plan import estimate_bytes
    from models.tasks import task_for

    config = TrainConfig(patch_size=tuple(patch), batch_size=batch, channels=tuple(channels))
    estimate = estimate_bytes(config, classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = task_for(config, classes).networks()["model"].to(device)
    opt = torch.optim.AdamW(net.parameters())
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(batch, 1, *patch, device=device)
    y = torch.randint(0, classes, (batch, 1, *patch), device=device)
    saved = 0

    def count(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = psutil.Process().memory_info().rss
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(count if step == 0 else (lambda t: t), lambda t: t):
            value = loss(net(x), y)
        value.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    # the model and batch were allocated before ``before``: add them back on both sides alike
    resident = sum(p.numel() * p.element_size() for p in net.parameters()) + x.numel() * 4 + y.numel() * 8
    return {"patch": patch, "batch": batch, "channels": channels, "device": str(device),
            "estimate_mib": round(estimate / 2 ** 20, 1), "measured_mib": round((peak + resident) / 2 ** 20, 1),
            "saved_activations_mib": round(saved / 2 ** 20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", nargs="+", default=["32,64,64", "64,96,96", "96,128,128"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", default="32,64,128,256")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process's configuration
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(**json.loads(args.one))))
        return
    channels = [int(c) for c in args.channels.split(",")]
    for text in args.patches:
        spec = {"patch": [int(v) for v in text.split(",")], "batch": args.batch, "channels": channels,
                "classes": args.classes}
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"patch {r['patch']} x {r['batch']}, channels {r['channels']} on {r['device']}: estimate "
              f"{r['estimate_mib']:.0f} MiB, measured {r['measured_mib']:.0f} MiB "
              f"(estimate / measured {r['estimate_mib'] / r['measured_mib']:.2f}); saved activations "
              f"{r['saved_activations_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
