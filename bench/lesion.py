"""Lesion segmentation with a planned U-Net: what issue 16 asks a GPU to show, in one command.

    .venv/bin/python bench/lesion.py                           # 60 patients, 300 s of training
    .venv/bin/python bench/lesion.py --patients 8 --seconds 20 --epochs 2   # a quick look (CPU)

The demo's synthetic archive (60 CT patients, 2 in 5 with liver lesions) is ingested,
labelled, split 0.6 / 0.2 / 0.2 and preprocessed (the library, no Prefect); then a U-Net with a
separate lesion class (no ``label_map``: liver 1, lesion 2) is trained with the settings
``models.plan`` chooses for this machine's training device (patch, batch, depth), epochs sized
to ``--seconds`` by a first one-epoch run, and its test Dice per class is reported, with
samples/s, the share of step time waiting for data and, on CUDA, the GPU's utilisation (NVML,
sampled every 100 ms) and peak memory. The demo's CPU budget gives lesion Dice 0.00 (README).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # datasets.py beside this file

from models.config import TrainConfig  # noqa: E402
from models.plan import plan_run  # noqa: E402
from models.run import TrainRun, train_model  # noqa: E402


def prepare(work: Path, patients: int) -> tuple[str, str]:
    """The labelled, preprocessed synthetic archive (cached in ``work``)."""
    from datasets import labelled_store

    ready = work / f"ready-{patients}.json"
    if ready.exists():
        info = json.loads(ready.read_text())
        return info["store"], info["version"]
    store, version, _ = labelled_store(work, patients)
    ready.write_text(json.dumps({"store": str(store), "version": version}))
    return str(store), version


def gpu_sampler(device: torch.device):
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GpuSampler(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=300.0, help="training budget after the first epoch")
    ap.add_argument("--steps", type=int, default=50, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default: as many as --seconds allows)")
    ap.add_argument("--memory-gb", type=float, default=None, help="plan for this memory instead of the device's")
    ap.add_argument("--workers", type=int, default=None, help="data-loading processes (default: 4 on CUDA, 0 on CPU)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ap.add_argument("--workdir", default=str(ROOT / "bench-output" / "lesion"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(args.workdir)
    store, version = prepare(work, args.patients)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    base = TrainRun(store=store, version=version, name="lesion-bench", augment=True,
                    train=TrainConfig(task="segmentation", steps_per_epoch=args.steps, val_steps=4, epochs=1,
                                      early_stopping=1000, num_workers=workers, amp=args.amp))
    memory = (int(args.memory_gb * 2 ** 30), f"{args.memory_gb:g} GiB") if args.memory_gb else None
    run, plan = plan_run(base, memory)
    print(f"plan {plan.plan_id()} on {plan.device}: patch {plan.patch_size}, batch {plan.batch_size}, channels "
          f"{plan.channels}, estimated {plan.estimated_bytes / 2 ** 20:.0f} of {plan.memory_bytes / 2 ** 20:.0f} MiB")
    # one epoch, timed (a short run of its own), then a run of the epochs the budget allows
    t0 = time.perf_counter()
    first = train_model(run, device=device)
    epoch_s = time.perf_counter() - t0
    epochs = args.epochs or max(1, int(args.seconds / max(epoch_s, 1e-3)))
    sampler = gpu_sampler(device)
    with sampler:
        summary = train_model(run.model_copy(update={"train": run.train.replace(epochs=epochs)}), device=device) \
            if epochs > 1 else first
    t = summary["throughput"]
    result = {"device": str(device), "plan": plan.train_settings() | {"plan_id": plan.plan_id()}, "epochs": epochs,
              "first_epoch_s": round(epoch_s, 1), "samples_per_s": t["samples_per_s"],
              "data_wait_share": t["data_wait_share"], "test": summary["test"], **sampler.result()}
    test = summary["test"]
    print(f"{epochs} epochs on {device}: {t['samples_per_s']} samples/s, data wait {100 * t['data_wait_share']:.0f} %"
          + (f", GPU utilisation {result['gpu_util_pct']} %, peak {result['gpu_mem_mib']} MiB"
             if "gpu_util_pct" in result else ""))
    print(f"test: liver Dice {test.get('dice_1', float('nan')):.3f}, lesion Dice {test.get('dice_2', float('nan')):.3f} "
          f"({test.get('volumes')} volumes)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
