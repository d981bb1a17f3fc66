"""Training-throughput benchmark: the same U-Net and patches fed by voxelflow's
ZarrPatchDataset and by a MONAI CacheDataset pipeline, in one run.

    .venv/bin/python bench/train.py            # synthetic archive, 8 patients
    .venv/bin/python bench/train.py --steps 20

Both pipelines serve 2 x (32, 64, 64) patches (a third centred on a labelled voxel) from the
same preprocessed volumes; the MONAI one loads the same volumes from NIfTI into a CacheDataset
and crops with RandCropByPosNegLabeld. Reported: samples/s and the share of step time spent
waiting for data, with 0 and 2 DataLoader workers. On a CUDA machine also: 8 workers, mixed
precision (bf16 autocast) against float32, the GPU's utilisation (NVML, sampled every 100 ms
while the steps run) and peak memory, and the model's step alone on batches already in GPU
memory (no data loading: the compute speed-up of mixed precision), with cuDNN autotuning off
and on (TrainConfig.cudnn_benchmark) and with AMP in the channels-last layout. The loader-fed
runs use the training code's defaults: no autotuning, a loss scaler for fp16 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.networks import autocast, grad_scaler, tuned_kernels  # noqa: E402
from models.tasks import build_networks  # noqa: E402
from models.train import TrainConfig  # noqa: E402
from voxelflow import catalog  # noqa: E402
from voxelflow.data import make_loader, patch_dataset  # noqa: E402
from voxelflow.export import export_label, export_volume  # noqa: E402


def prepare(work: Path, patients: int) -> tuple[str, str]:
    from voxelflow.ingest import IngestConfig, run_local, store_key
    from voxelflow.labels import import_segmentations, make_split
    from voxelflow.preprocess import PreprocessConfig, resolve
    from voxelflow.preprocess import run_local as preprocess
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    store = work / "store"
    if (work / "ready.json").exists():
        info = json.loads((work / "ready.json").read_text())
        return info["store"], info["version"]
    shutil.rmtree(work, ignore_errors=True)
    archive = build_synthetic_archive(work / "archive", SynthConfig(patients=patients, mr_patients=0))
    run_local(IngestConfig(sources=[str(archive / "images")], store=str(store)))
    import_segmentations(store, archive / "labels" / "segmentations.csv", store_key(str(store)))
    make_split(store, seed=0, fractions=(0.75, 0.125, 0.125))
    config = resolve(PreprocessConfig(store=str(store), labelled_only=True))
    preprocess(config)
    (work / "ready.json").write_text(json.dumps({"store": str(store), "version": config.version()}))
    return str(store), config.version()


def monai_loader(store: str, version: str, work: Path, patch, batch: int, workers: int):
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandCropByPosNegLabeld

    root = Path(store) / "preprocessed" / version
    nifti = work / "nifti"
    items = []
    for r in catalog.read_table(root, "preprocessed").to_pylist():
        img, lab = nifti / f"{r['volume_id']}.nii.gz", nifti / f"{r['volume_id']}_seg.nii.gz"
        if not img.exists():
            export_volume(root, r["volume_id"], img)
            export_label(root, r["volume_id"], "segmentation", lab)
        items.append({"image": str(img), "label": str(lab)})
    xyz = tuple(patch[::-1])
    transform = Compose([LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"]),
                         RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=xyz,
                                                pos=1, neg=2, num_samples=1)])
    ds = CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=2, progress=False)
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0), len(items)


class GpuSampler:
    """Mean GPU utilisation (NVML's percentage of time a kernel was running) and peak memory
    used, sampled in a thread while the block runs; ``result`` is empty without NVML."""

    def __init__(self, device, period_s: float = 0.1):
        self.period, self.samples, self.handle = period_s, [], None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception as e:  # no nvidia-ml-py, or no NVML in this container
                print(f"  (no GPU utilisation: {e})", file=sys.stderr)

    def _loop(self):
        while not self._stop.wait(self.period):
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            self.samples.append((util.gpu, mem.used / 2**20))

    def __enter__(self):
        if self.handle is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self._stop.set()
            self._thread.join()

    def result(self) -> dict:
        if not self.samples:
            return {}
        return {"gpu_util_pct": round(sum(u for u, _ in self.samples) / len(self.samples), 1),
                "gpu_mem_mib": round(max(m for _, m in self.samples))}


def run(loader, steps: int, device, amp: bool, monai: bool) -> dict:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    model = build_networks(TrainConfig(), 3)["model"].to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    scaler = grad_scaler(device, amp)  # as models.train: a loss scaler for fp16 only
    it = iter(loader)
    wait = total = 0.0
    samples = 0
    sampler = GpuSampler(device)
    for step in range(steps + 2):
        if step == 2:
            sampler.__enter__()
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        x, y = batch["image"].to(device).float(), batch["label"].to(device)
        if monai:  # MONAI gives (B, C, x, y, z); the model is size-agnostic, but keep the same voxels
            x, y = x.permute(0, 1, 4, 3, 2), y.permute(0, 1, 4, 3, 2)
        with autocast(device, amp):
            loss = loss_fn(model(x), y.long())
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= 2:  # the first steps pay for worker start-up and caches
            wait += t1 - t0
            total += t2 - t0
            samples += x.shape[0]
    sampler.__exit__(None, None, None)
    return {"samples_per_s": round(samples / total, 2), "data_wait_share": round(wait / total, 3), **sampler.result()}


def run_model_only(steps: int, device, amp: bool, patch, batch: int, tuned: bool = True,
                   channels_last: bool = False) -> dict:
    """The training step alone, on one random batch already in device memory; ``tuned``:
    cuDNN autotuning on (``TrainConfig.cudnn_benchmark``), else off; ``channels_last``: model and
    batch in the channels-last 3-D layout (tensor-core convolutions' native layout)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = tuned
    try:
        return _model_only(steps, device, amp, patch, batch, channels_last)
    finally:
        torch.backends.cudnn.benchmark = old


def _model_only(steps: int, device, amp: bool, patch, batch: int, channels_last: bool) -> dict:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    model = build_networks(TrainConfig(), 3)["model"].to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    scaler = grad_scaler(device, amp)
    x = torch.randn(batch, 1, *patch, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 3, (batch, 1, *patch), device=device)
    sampler = GpuSampler(device)

    def step():
        with autocast(device, amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with sampler:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    out = {"samples_per_s": round(steps * batch / total, 2), "data_wait_share": 0.0, **sampler.result()}
    if device.type == "cuda":
        out["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model-steps", type=int, default=200,
                    help="steps of each model-only run (CUDA): a 40-step run of the small batch lasts half a second, "
                         "and repeated runs of it differed by 20 %%")
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--workdir", default=str(ROOT / "bench-output" / "train"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store, version = prepare(work, args.patients)
    patch, batch = (32, 64, 64), 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    results = []
    tuning = tuned_kernels(device, TrainConfig().optimisation.cudnn_benchmark)  # as models.train.fit runs by default
    tuning.__enter__()
    for amp in ([False, True] if cuda else [False]):
        for workers in ((0, 2, 8) if cuda else (0, 2)):
            ds = patch_dataset(store, patch, version=version, split="train", samples_per_epoch=10_000)
            r1 = run(make_loader(ds, batch_size=batch, num_workers=workers), args.steps, device, amp, monai=False)
            loader, n = monai_loader(store, version, work, patch, batch, workers)
            r2 = run(loader, args.steps, device, amp, monai=True)
            results.append({"amp": amp, "workers": workers, "voxelflow ZarrPatchDataset": r1,
                            "MONAI CacheDataset": r2})
            print(f"  amp={amp} workers={workers}: voxelflow {r1}, MONAI {r2}", file=sys.stderr)
    tuning.__exit__(None, None, None)
    model_only = []
    if cuda:  # the compute alone: the batch above and a larger one, float32 against mixed precision,
        # cuDNN autotuning off (fit's default) and on (TrainConfig.cudnn_benchmark)
        for b in (batch, 16):
            for tuned in (False, True):
                row = {"batch": b, "tuned": tuned}
                for amp in (False, True):
                    row[amp] = run_model_only(args.model_steps, device, amp, patch, b, tuned)
                row["cl"] = run_model_only(args.model_steps, device, True, patch, b, tuned, channels_last=True)
                model_only.append(row)
                print(f"  model only, batch {b}, autotune {tuned}: fp32 {row[False]}, amp {row[True]}, "
                      f"amp channels-last {row['cl']}", file=sys.stderr)
    (work / "results.json").write_text(json.dumps({"device": str(device), "results": results, "model_only": [
        {"batch": r["batch"], "cudnn_benchmark": r["tuned"], "fp32": r[False], "amp": r[True],
         "amp_channels_last": r["cl"]} for r in model_only]}, indent=2))
    gpu = f" ({torch.cuda.get_device_name(device)}, torch {torch.__version__})" if cuda else ""
    print(f"\nU-Net (1.2 M parameters), batches of {batch} x {patch} patches, {args.steps} steps, device "
          f"{device}{gpu}, {os.cpu_count()} CPUs\n")
    util = lambda v: f"{v['gpu_util_pct']:.0f} %" if "gpu_util_pct" in v else "n/a"  # noqa: E731
    head = "| pipeline | workers | AMP | samples/s | data wait share | speed vs MONAI |"
    print(head + (" AMP speed-up | GPU utilisation |" if cuda else ""))
    print("|---|---:|---|---:|---:|---:|" + ("---:|---:|" if cuda else ""))
    fp32 = {(r["workers"], k): r[k]["samples_per_s"] for r in results if not r["amp"]
            for k in ("voxelflow ZarrPatchDataset", "MONAI CacheDataset")}
    for r in results:
        base = r["MONAI CacheDataset"]["samples_per_s"]
        for k in ("voxelflow ZarrPatchDataset", "MONAI CacheDataset"):
            v = r[k]
            line = (f"| {k} | {r['workers']} | {'on' if r['amp'] else 'off'} | {v['samples_per_s']:.2f} | "
                    f"{100 * v['data_wait_share']:.0f} % | {v['samples_per_s'] / base:.2f}x |")
            if cuda:
                speedup = f"{v['samples_per_s'] / fp32[(r['workers'], k)]:.2f}x" if r["amp"] else ""
                line += f" {speedup} | {util(v)} |"
            print(line)
    if model_only:
        print(f"\nThe training step alone (one batch already in GPU memory, no data loading, {args.model_steps} steps):\n")
        print("| batch | cuDNN autotune | float32 samples/s | AMP samples/s | AMP speed-up | "
              "AMP channels-last samples/s | GPU utilisation fp32 / AMP | peak memory fp32 / AMP |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in model_only:
            a, b = r[False], r[True]
            print(f"| {r['batch']} | {'on' if r['tuned'] else 'off'} | {a['samples_per_s']:.1f} | {b['samples_per_s']:.1f} | "
                  f"{b['samples_per_s'] / a['samples_per_s']:.2f}x | {r['cl']['samples_per_s']:.1f} | {util(a)} / {util(b)} | "
                  f"{a.get('peak_allocated_mib', 'n/a')} / {b.get('peak_allocated_mib', 'n/a')} MiB |")


if __name__ == "__main__":
    main()
