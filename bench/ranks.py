"""Data-parallel training throughput: the same U-Net trained by 1 rank and by 2 ranks (one per
Dask worker process, joined with gloo on a CPU and NCCL on GPUs), in one run.

    .venv/bin/python bench/ranks.py                      # synthetic archive, 8 patients
    .venv/bin/python bench/ranks.py --epochs 3 --steps 20 --patch 32,64,64 --batch 2

Each rank runs ``models.train.fit`` as the train flow's ``train-rank`` task does (its own shard
of every epoch's patches, gradients averaged by DistributedDataParallel, validation on rank 0).
On a CPU the machine's cores are split between the ranks (2 ranks x 1 thread against 1 rank x 2
threads on 2 cores); on a CUDA machine each rank has its own GPU, and 2 ranks run only where two
GPUs exist. Reported per world size: samples/s in all (median over epochs after the first) and
per rank, the data-wait share of the slowest rank, and on CUDA each rank's GPU utilisation
(NVML) and peak memory; then the 2-rank / 1-rank ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bench_train():
    """bench/train.py as a module (its archive preparation and GPU sampler)."""
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rank_run(store: str, version: str, settings: dict, out: str, rank: int, world: int, init: str,
             threads: int) -> dict:
    """One rank's training in a Dask worker process; its throughput figures."""
    sys.path.insert(0, str(ROOT))
    from models import distributed
    from models.distributed import SINGLE, Ranks
    from models.train import TrainConfig, fit
    from voxelflow.data import patch_dataset

    torch.set_num_threads(threads)
    config = TrainConfig(**settings)
    s = config.sampling
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    train = patch_dataset(store, s.patch_size, version=version, split="train", seed=0, foreground_oversample=0.33,
                          samples_per_epoch=s.steps_per_epoch * s.batch_size)
    val = patch_dataset(store, s.patch_size, version=version, split="validation", seed=1,
                        samples_per_epoch=s.val_steps * s.batch_size, foreground_oversample=0.33)
    ranks = Ranks(rank, world, init, timeout_s=600) if world > 1 else SINGLE
    sampler = _bench_train().GpuSampler(device)
    with distributed.joined(ranks, device), sampler:
        result = fit(config, train, val, out, num_classes=3, device=device, ranks=ranks)
    history = result["history"][1:] or result["history"]  # the first epoch carries the start-up
    per_rank = [h.get("rank_samples_per_s") or [h["samples_per_s"]] for h in history]
    return {"rank": rank, "device": str(device), "threads": threads,
            "samples_per_s": [round(float(np.median([r[i] for r in per_rank])), 2) for i in range(world)],
            "data_wait_share": round(float(np.median([h["data_wait_share"] for h in history])), 4),
            **sampler.result()}


def measure(client, store: str, version: str, settings: dict, world: int, work: Path) -> dict:
    from models.distributed import free_port

    workers = sorted(client.scheduler_info()["workers"])[:world]
    init = f"tcp://127.0.0.1:{client.run(free_port, workers=[workers[0]])[workers[0]]}"
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    out = tempfile.mkdtemp(prefix=f"ranks{world}-", dir=work)
    futures = [client.submit(rank_run, store, version, settings, out, rank, world, init, threads, pure=False,
                             workers=[w], allow_other_workers=False) for rank, w in enumerate(workers)]
    results = client.gather(futures)
    per_rank = results[0]["samples_per_s"]
    return {"world_size": world, "samples_per_s": round(sum(per_rank), 2), "rank_samples_per_s": per_rank,
            "data_wait_share": max(r["data_wait_share"] for r in results),
            "ranks": [{k: v for k, v in r.items() if k != "samples_per_s"} for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch and rank")
    ap.add_argument("--patch", default="32,64,64")
    ap.add_argument("--batch", type=int, default=2, help="patches per step and rank")
    ap.add_argument("--channels", default="16,32,64,128")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ap.add_argument("--workdir", default=str(ROOT / "bench-output" / "ranks"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store, version = _bench_train().prepare(work / "data", args.patients)
    settings = {"task": "segmentation", "patch_size": [int(v) for v in args.patch.split(",")],
                "batch_size": args.batch, "channels": [int(v) for v in args.channels.split(",")],
                "epochs": args.epochs, "steps_per_epoch": args.steps, "val_steps": 2, "early_stopping": 100,
                "amp": args.amp}
    gpus = torch.cuda.device_count()
    worlds = [1, 2] if gpus != 1 else [1]
    rows = []
    with LocalCluster(n_workers=max(worlds), threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        for world in worlds:
            row = measure(client, store, version, settings, world, work)
            rows.append(row)
            util = [r.get("gpu_util_pct") for r in row["ranks"]]
            print(f"{world} rank(s): {row['samples_per_s']:.1f} samples/s (per rank {row['rank_samples_per_s']}), "
                  f"data wait {100 * row['data_wait_share']:.0f} %"
                  + (f", GPU utilisation {util} %" if any(u is not None for u in util) else "")
                  + f" on {', '.join(r['device'] for r in row['ranks'])}")
    if len(rows) == 2:
        print(f"2 ranks / 1 rank: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}x samples/s")
    elif gpus == 1:
        print("one GPU: the 2-rank row needs two")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
