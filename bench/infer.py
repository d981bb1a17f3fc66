"""Bulk-inference benchmark, in one run on the same volumes and model:

* voxelflow's bulk inference (``models.infer.run_local``: read the preprocessed volume from
  Zarr, sliding window, map the prediction back to the original grid, write it into the store,
  lesion table);
* the model's pure forward time (the same sliding windows over tensors already in memory);
* a plain MONAI loop (LoadImage from NIfTI, sliding_window_inference, SaveImage to NIfTI).

    .venv/bin/python bench/infer.py     # uses (or builds) bench-output/train's store

Reports volumes/s and the share of voxelflow's time that is not model compute.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.run import TrainRun, train_model  # noqa: E402
from models.train import TrainConfig  # noqa: E402
from voxelflow import catalog  # noqa: E402
from voxelflow.export import export_volume  # noqa: E402
from models.infer import InferConfig, run_local  # noqa: E402
from voxelflow.store import open_volume  # noqa: E402


def main():
    sys.path.insert(0, str(ROOT / "bench"))
    from train import prepare  # the same synthetic store as bench/train.py

    work = ROOT / "bench-output" / "train"
    store, version = prepare(work, 8)
    patch = (32, 64, 64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summary = train_model(TrainRun(store=store, version=version, name="bench-seg", augment=False,
                                   train=TrainConfig(task="segmentation", patch_size=patch, epochs=3,
                                                     steps_per_epoch=15, val_steps=1)), device=device)
    # (trained enough to give organ-like predictions: an untrained net's speckle would turn the
    # lesion table into tens of thousands of one-voxel components)
    root = Path(store) / "preprocessed" / version
    vids = [r["volume_id"] for r in catalog.read_table(root, "preprocessed").to_pylist() if r["status"] == "done"]
    # 1. voxelflow bulk inference (fresh: drop earlier predictions of this model)
    preds = catalog.read_table(store, "predictions")
    if preds.num_rows:
        keep = [r for r in preds.to_pylist() if r["model"] != "bench-seg"]
        import pyarrow as pa

        catalog.write_table(store, "predictions", pa.Table.from_pylist(keep, schema=catalog.PREDICTION_SCHEMA))
    # warm-up: one volume (imports, thread pools, allocator) outside the timings
    from models import infer

    config = InferConfig(store=store, name="bench-seg", version=summary["version"])
    info = infer.model_info(config)
    predictor = infer.load_predictor(config, info, device)
    infer.infer_volume(predictor, vids[0])
    t0 = time.perf_counter()
    out = run_local(InferConfig(store=store, name="bench-seg", version=summary["version"]))
    t_vf = time.perf_counter() - t0
    assert out["predicted"] == len(vids)
    # 1b. the same stages, forced through the reader / model / writer pipeline (the default on CUDA)
    t0 = time.perf_counter()
    infer.infer_volumes(predictor, vids, pipeline=True)
    t_pipe = time.perf_counter() - t0
    # 1c. where a volume's time goes: the stages one after the other, timed apart
    from models.networks import tuned_kernels

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stages = {"read": 0.0, "model": 0.0, "post-process and write": 0.0}
    with tuned_kernels(device):
        for v in vids:
            t0 = time.perf_counter()
            loaded = predictor.read(v)
            t1 = time.perf_counter()
            computed = predictor.compute(v, loaded)
            sync()
            t2 = time.perf_counter()
            predictor.finish(v, loaded, computed)
            t3 = time.perf_counter()
            stages["read"] += t1 - t0
            stages["model"] += t2 - t1
            stages["post-process and write"] += t3 - t2
    sw = predictor.window_batch()  # windows per model call, as voxelflow runs
    # 2. pure forward: the same windows over tensors in memory
    from monai.inferers import sliding_window_inference

    model = predictor.model  # the registered network, in eval mode
    tensors = [torch.from_numpy(np.ascontiguousarray(open_volume(root, v).array[...], dtype=np.float32))[None, None]
               .to(device) for v in vids]
    from models.networks import autocast

    # the precision voxelflow's inference runs at (bf16 autocast on CUDA, float32 on CPU), and
    # the clock stops when the GPU has finished, not when the last kernel was queued; cuDNN
    # autotuning, as voxelflow's inference runs on CUDA
    def forward(amp: bool, tuned: bool = True) -> float:
        with torch.no_grad(), autocast(device, amp), tuned_kernels(device, tuned):
            for x in tensors:  # the autotuner's first look at these shapes, outside the clock
                sliding_window_inference(x, roi_size=patch, sw_batch_size=sw, predictor=model, overlap=0.25,
                                         mode="gaussian")
            sync()
            t0 = time.perf_counter()
            for x in tensors:
                sliding_window_inference(x, roi_size=patch, sw_batch_size=sw, predictor=model, overlap=0.25,
                                         mode="gaussian")
            sync()
            return time.perf_counter() - t0

    t_fwd = forward(True)
    t_fwd32 = forward(False) if device.type == "cuda" else None
    t_fwd_plain = forward(True, tuned=False) if device.type == "cuda" else None
    # 3. a plain MONAI loop over NIfTI files
    from monai.transforms import EnsureChannelFirst, LoadImage, SaveImage

    nifti = work / "infer-nifti"
    shutil.rmtree(nifti, ignore_errors=True)
    paths = [export_volume(root, v, nifti / f"{v}.nii.gz") for v in vids]
    load, chan = LoadImage(image_only=True), EnsureChannelFirst()
    save = SaveImage(output_dir=str(nifti / "out"), output_postfix="seg", separate_folder=False, print_log=False)

    def monai_loop(batch: int) -> float:  # PyTorch's default settings (no cuDNN autotuning)
        with torch.no_grad(), autocast(device, True):
            t0 = time.perf_counter()
            for p in paths:
                x = chan(load(str(p)))[None].to(device)
                y = sliding_window_inference(x, roi_size=patch[::-1], sw_batch_size=batch, predictor=model,
                                             overlap=0.25, mode="gaussian")
                save(y[0].float().argmax(0, keepdim=True).cpu())
            return time.perf_counter() - t0

    t_monai = monai_loop(2)
    t_monai_sw = monai_loop(sw) if sw != 2 else None
    n = len(vids)
    rows = [("voxelflow bulk inference (store in, store out)", t_vf),
            ("voxelflow, reader/model/writer threads (default on CUDA)", t_pipe),
            (f"model forward only (tensors in memory, {sw} windows per call)", t_fwd)]
    if t_fwd32 is not None:
        rows.append((f"model forward only, float32 (no autocast, {sw} windows per call)", t_fwd32))
        rows.append((f"model forward only, no cuDNN autotuning ({sw} windows per call)", t_fwd_plain))
    rows.append(("plain MONAI loop (NIfTI in, NIfTI out, 2 windows per call)", t_monai))
    if t_monai_sw is not None:
        rows.append((f"plain MONAI loop, {sw} windows per call", t_monai_sw))
    (work / "infer-results.json").write_text(json.dumps({"volumes": n, "device": str(device),
                                                         "seconds": {k: v for k, v in rows},
                                                         "stages_seconds": stages}, indent=2))
    gpu = (f" ({torch.cuda.get_device_name(device)}, bf16 autocast unless a row says otherwise; cuDNN autotuning "
           f"in the voxelflow and forward-only rows)"
           if device.type == "cuda" else "")
    print(f"\n{n} preprocessed CT volumes, U-Net, 32x64x64 windows (overlap 0.25), device {device}{gpu}, "
          f"{os.cpu_count()} CPUs\n")
    print("| pipeline | seconds | volumes/s |")
    print("|---|---:|---:|")
    for k, v in rows:
        print(f"| {k} | {v:.2f} | {n / v:.2f} |")
    print(f"\nvoxelflow time outside model compute: {100 * (1 - t_fwd / t_vf):.0f} %; "
          f"speed vs the plain MONAI loop: {t_monai / t_vf:.2f}x")
    print("voxelflow's stages one after the other, per volume: " +
          ", ".join(f"{k} {1000 * v / n:.1f} ms" for k, v in stages.items()))


if __name__ == "__main__":
    main()
