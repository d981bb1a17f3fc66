"""Patch-loading benchmark: random 96^3 patches per second, voxelflow's Zarr patch dataset
against nibabel on .nii.gz and MONAI's LoadImage + random crop, in one run.

    .venv/bin/python bench/patch_loading.py            # 3 CT volumes of 300x512x512
    .venv/bin/python bench/patch_loading.py --quick    # smaller, for a look

Every loader serves the same kind of sample (a float32 96^3 patch at a random position of a
random volume) through a torch DataLoader with 0 and 2 worker processes. Prints patches/s and
the ratio to nibabel; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voxelflow import store as st  # noqa: E402
from voxelflow.data import VolumeEntry, ZarrPatchDataset  # noqa: E402
from voxelflow.phantom import ct_phantom  # noqa: E402


class NibabelPatches(Dataset):
    """What a training script does without a chunked store: open the .nii.gz, slice a patch."""

    def __init__(self, paths, shape, patch, n, seed=0):
        self.paths, self.shape, self.patch, self.n, self.seed = paths, shape, patch, n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        path = self.paths[int(rng.integers(len(self.paths)))]
        o = [int(rng.integers(s - p + 1)) for s, p in zip(self.shape, self.patch)]  # (x, y, z)
        proxy = nib.load(path).dataobj
        patch = np.asarray(proxy[o[0]:o[0] + self.patch[0], o[1]:o[1] + self.patch[1], o[2]:o[2] + self.patch[2]],
                           dtype=np.float32)
        return {"image": torch.from_numpy(patch)[None]}


def monai_dataset(paths, patch, n):
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropd

    transform = Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
                         RandSpatialCropd(keys="image", roi_size=patch, random_size=False)])
    return MonaiDataset([{"image": str(paths[i % len(paths)])} for i in range(n)], transform=transform)


def rate(dataset, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up and first open are not what is measured
    t0 = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=str(ROOT / "bench-output" / "patches"))
    args = ap.parse_args()
    work = Path(args.workdir)
    shape_zyx = (96, 160, 160) if args.quick else (300, 512, 512)  # a typical CT series
    n_vol = 2 if args.quick else 3
    patch = (96, 96, 96)
    shutil.rmtree(work, ignore_errors=True)
    store = work / "store"
    st.init_store(store)
    paths = []
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    for i in range(n_vol):
        hu = ct_phantom(shape_zyx, spacing=(1.5, 0.8, 0.8), seed=i)
        st.write_volume(store, f"v{i}", hu, affine)
        path = work / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine), path)
        paths.append(path)
    entries = [VolumeEntry(f"v{i}", shape_zyx) for i in range(n_vol)]
    n_fast, n_slow = (60, 8) if args.quick else (200, 10)
    results = []
    for workers in (0, 2):
        zarr_ds = ZarrPatchDataset(str(store), entries, patch, label_name=None, foreground_oversample=0,
                                   samples_per_epoch=n_fast)
        nib_ds = NibabelPatches(paths, shape_zyx[::-1], patch, n_slow)
        monai_ds = monai_dataset(paths, patch, n_slow)
        r = {"workers": workers, "voxelflow zarr": rate(zarr_ds, workers), "nibabel .nii.gz": rate(nib_ds, workers),
             "MONAI LoadImage + crop": rate(monai_ds, workers)}
        results.append(r)
        print(f"  {workers} workers: " + ", ".join(f"{k} {v:.2f}/s" for k, v in r.items() if k != "workers"),
              file=sys.stderr)
    (work / "results.json").write_text(json.dumps({"volumes": n_vol, "shape_zyx": shape_zyx, "patch": patch,
                                                   "cpus": os.cpu_count(), "results": results}, indent=2))
    print(f"\n{n_vol} CT volumes of {shape_zyx[0]}x{shape_zyx[1]}x{shape_zyx[2]} (int16), random 96^3 patches, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| loader | workers | patches/s | vs nibabel |")
    print("|---|---:|---:|---:|")
    for r in results:
        base = r["nibabel .nii.gz"]
        for k in ("voxelflow zarr", "nibabel .nii.gz", "MONAI LoadImage + crop"):
            print(f"| {k} | {r['workers']} | {r[k]:.2f} | {r[k] / base:.1f}x |")


if __name__ == "__main__":
    main()
