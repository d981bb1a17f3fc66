"""Lesions of a segmentation: its connected components measured in world space (size in mL,
centroid and bounding box in mm, peak probability), as rows of ``catalog/lesions.parquet``."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from voxelflow.geometry import voxel_sizes


def components(pred: np.ndarray, probs: np.ndarray, affine: np.ndarray, vid: str, model: str,
                version: str, min_voxels: int = 1) -> list[dict]:
    """Connected components of each foreground class with at least ``min_voxels`` voxels,
    measured together per class, never one Python step over voxels per component: one
    ``ndimage.label`` per class, then counts, centroids and peak probabilities as bincounts
    and a scatter over the component voxels only (the same sums, in the same order, as
    scipy.ndimage's labelled statistics, at a fraction of their passes over the volume)."""
    voxel_ml = float(np.prod(voxel_sizes(affine))) / 1000.0
    rows = []
    for label in range(1, probs.shape[0]):
        comps, n = ndimage.label(pred == label)
        if n == 0:
            continue
        where = np.flatnonzero(comps)  # the component voxels, in raster order
        ids = comps.ravel()[where]
        counts = np.bincount(ids, minlength=n + 1)
        big = counts >= min_voxels
        big[0] = False
        if not big.any():
            continue
        if not big[1:].all():  # drop specks first: a noisy map can hold 10^5 of them
            # the kept components renumbered 1..n in their order (raster order of their first
            # voxels), which is how labelling the kept voxels again would number them
            renumber = (np.cumsum(big) * big).astype(comps.dtype)
            keep = big[ids]
            where, ids = where[keep], renumber[ids[keep]]
            comps = renumber[comps]
            n = int(big.sum())
        voxels = np.bincount(ids, minlength=n + 1)
        coords = np.unravel_index(where, comps.shape)
        centroids = np.stack([np.bincount(ids, weights=c.astype(np.float64), minlength=n + 1)[1:] / voxels[1:]
                              for c in coords], axis=1)  # (n, z y x)
        voxels = voxels[1:]
        values = torch.from_numpy(probs[label].ravel()[where].astype(np.float64))
        peak = torch.zeros(n + 1, dtype=torch.float64).scatter_reduce_(
            0, torch.from_numpy(ids.astype(np.int64)), values, reduce="amax").numpy()[1:]
        boxes = ndimage.find_objects(comps)
        lo = np.array([[sl.start for sl in b] for b in boxes], dtype=np.float64)[:, ::-1]  # (n, x y z)
        hi = np.array([[sl.stop - 1 for sl in b] for b in boxes], dtype=np.float64)[:, ::-1]
        a, t = affine[:3, :3], affine[:3, 3]
        # world bounding box of each index box: per world axis, the extreme corner term by term
        terms_lo, terms_hi = lo[:, None, :] * a[None], hi[:, None, :] * a[None]  # (n, world, index)
        world_min = t + np.minimum(terms_lo, terms_hi).sum(-1)
        world_max = t + np.maximum(terms_lo, terms_hi).sum(-1)
        centres = centroids[:, ::-1] @ a.T + t
        for k in range(n):
            rows.append({"volume_id": vid, "model": model, "version": version, "label": label, "component": k + 1,
                         "voxels": int(voxels[k]), "volume_ml": float(voxels[k]) * voxel_ml,
                         "centroid_mm": centres[k].tolist(), "bbox_min_mm": world_min[k].tolist(),
                         "bbox_max_mm": world_max[k].tolist(), "max_probability": float(peak[k])})
    return rows
