"""A dataset's fingerprint: the facts about its labelled volumes that a training plan is
derived from (``models.plan``), as nnU-Net's "dataset fingerprint" is.

    spacings, shapes     per labelled volume (the raw volumes', or a preprocessed copy's grid)
    intensity            per modality: mean, sd and percentiles of the foreground voxels (label
                         > 0), sampled from every volume with a seeded generator
    class_voxels         voxels per label value over all volumes (the labels catalog's counts)

Its digest names it: the same catalog and labels give the same fingerprint, so the same plan.
The target-spacing rule (:func:`target_spacing`) lives here because preprocessing uses it as its
default too.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from voxelflow import catalog
from voxelflow.errors import InvalidInputError
from voxelflow.store import open_label, open_volume

# nnU-Net samples 10^4 foreground voxels per case for its intensity statistics
SAMPLES_PER_VOLUME = 10_000
# an axis is "low resolution" when its spacing exceeds this many times the finest other axis
ANISOTROPY = 3.0


class IntensityStats(BaseModel):
    """Foreground intensities of one modality (raw values: HU for CT)."""

    model_config = ConfigDict(frozen=True)

    mean: float
    sd: float
    median: float
    p00_5: float
    p99_5: float
    voxels: int  # sampled foreground voxels behind these figures


class Fingerprint(BaseModel):
    """What a plan is derived from. ``spacings`` are (x, y, z) mm, ``shapes`` (z, y, x) voxels,
    one of each per volume in ``volumes`` order."""

    model_config = ConfigDict(frozen=True)

    store: str
    label_name: str
    version: str | None  # the preprocessed copy whose grid ``spacings``/``shapes`` describe
    volumes: tuple[str, ...]
    modalities: tuple[str, ...]
    spacings: tuple[tuple[float, float, float], ...]
    shapes: tuple[tuple[int, int, int], ...]
    intensity: dict[str, IntensityStats]
    class_voxels: dict[int, int]

    def digest(self) -> str:
        """A name for what was measured (the store's path left out: a copy of the data has the
        same fingerprint)."""
        body = self.model_dump(mode="json", exclude={"store"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    def target_spacing(self) -> tuple[float, float, float]:
        return target_spacing(self.spacings, self.shapes)

    def median_shape(self, spacing: tuple[float, float, float] | None = None) -> tuple[int, int, int]:
        """The median (z, y, x) shape of the volumes resampled to ``spacing`` (default: the
        target spacing)."""
        spacing = spacing or self.target_spacing()
        zyx = np.asarray(spacing, dtype=float)[::-1]
        shapes = [np.asarray(sh, dtype=float) * np.asarray(sp, dtype=float)[::-1] / zyx
                  for sh, sp in zip(self.shapes, self.spacings)]
        return tuple(int(round(v)) for v in np.median(np.stack(shapes), axis=0))

    def total_voxels(self, spacing: tuple[float, float, float] | None = None) -> int:
        """All the volumes' voxels at ``spacing`` (default: the target spacing)."""
        spacing = spacing or self.target_spacing()
        zyx = np.asarray(spacing, dtype=float)[::-1]
        return int(sum(np.prod(np.asarray(sh, dtype=float) * np.asarray(sp, dtype=float)[::-1] / zyx)
                       for sh, sp in zip(self.shapes, self.spacings)))


def target_spacing(spacings, shapes) -> tuple[float, float, float]:
    """nnU-Net's rule: the median spacing per axis, except that an axis much coarser than the
    others (spacing > 3x the finest other one, and fewer than a third of their voxels) takes
    the 10th percentile of its spacings, so thick-slice scans are not resampled to the thickest
    slices of the set (which would throw away the thinner scans' resolution).

    Args:
        spacings: (x, y, z) mm per volume.
        shapes: (z, y, x) voxels per volume.
    """
    sp = np.asarray(spacings, dtype=float)
    if sp.ndim != 2 or sp.shape[1] != 3 or not len(sp):
        raise InvalidInputError("fingerprint", f"target spacing needs (x, y, z) spacings, got {sp.shape}")
    target = np.median(sp, axis=0)
    sizes = np.median(np.asarray(shapes, dtype=float)[:, ::-1] * sp / target, axis=0)  # (x, y, z) voxels
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    if target[worst] > ANISOTROPY * max(target[others]) and sizes[worst] * ANISOTROPY < min(sizes[others]):
        coarse = float(np.percentile(sp[:, worst], 10))
        # never finer than the other axes: the low-resolution axis stays the coarsest
        target[worst] = max(coarse, max(target[others]) * 1.00001)
    return tuple(round(float(v), 4) for v in target)


def fingerprint(store: str | os.PathLike, label_name: str = "segmentation", version: str | None = None,
                samples_per_volume: int = SAMPLES_PER_VOLUME, seed: int = 0, intensities: bool = True) -> Fingerprint:
    """The fingerprint of the volumes of ``store`` labelled ``label_name``.

    Args:
        store: the store.
        label_name: the label whose foreground the intensity statistics and class counts use.
        version: a preprocessed copy: its grid (spacing, cropped shapes) replaces the raw
            volumes' (the intensities stay the raw ones: HU for CT).
        samples_per_volume: foreground voxels drawn per volume for the intensity statistics.
        seed: the draw's seed.
        intensities: sample the foreground intensities (every labelled volume is read); without,
            the fingerprint holds the catalog's facts only (what sizing a patch needs).

    Raises:
        InvalidInputError: no volume carries that label.
    """
    store = str(store)
    labels = [r for r in catalog.read_table(store, "labels").to_pylist() if r["name"] == label_name]
    by_id = {r["volume_id"]: r for r in catalog.read_table(store, "volumes").to_pylist()}
    labelled = sorted(r["volume_id"] for r in labels if r["volume_id"] in by_id and len(by_id[r["volume_id"]]["shape"]) == 3)
    grid = {vid: (tuple(by_id[vid]["spacing"]), tuple(by_id[vid]["shape"])) for vid in labelled}
    if version is not None:
        done = {r["volume_id"]: r for r in catalog.preprocessed_volumes(store, version)}
        labelled = [v for v in labelled if v in done]
        grid = {v: (tuple(done[v]["spacing"]), tuple(done[v]["shape"])) for v in labelled}
    if not labelled:
        where = f"preprocessed copy {version} of {store}" if version else store
        raise InvalidInputError(where, f"no 3-D volume labelled {label_name!r} to fingerprint")
    class_voxels: dict[int, int] = {}
    for r in labels:
        if r["volume_id"] in grid:
            for value, count in zip(r["values"] or [], r["voxels"] or []):
                class_voxels[int(value)] = class_voxels.get(int(value), 0) + int(count)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {}
    for vid in labelled if intensities else []:
        samples.setdefault(by_id[vid]["modality"] or "OT", []).append(
            _foreground_sample(store, vid, label_name, samples_per_volume, rng))
    return Fingerprint(store=store, label_name=label_name, version=version, volumes=tuple(labelled),
                       modalities=tuple(by_id[v]["modality"] or "OT" for v in labelled),
                       spacings=tuple(tuple(round(float(s), 6) for s in grid[v][0]) for v in labelled),
                       shapes=tuple(tuple(int(n) for n in grid[v][1]) for v in labelled),
                       intensity={m: _stats(np.concatenate(s)) for m, s in sorted(samples.items())},
                       class_voxels=dict(sorted(class_voxels.items())))


def _foreground_sample(store: str, volume_id: str, label_name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` intensities of voxels labelled > 0, drawn without replacement."""
    image = np.asarray(open_volume(store, volume_id).array[...])
    label = np.asarray(open_label(store, volume_id, label_name)[...])
    if label.shape != image.shape:
        raise InvalidInputError(f"{store}/volumes/{volume_id}",
                                f"label {label_name!r} has shape {label.shape}, the volume {image.shape}")
    values = image[label > 0]
    if values.size > n:
        values = values[np.sort(rng.choice(values.size, n, replace=False))]
    return values.astype(np.float64)


def _stats(values: np.ndarray) -> IntensityStats:
    if not values.size:
        return IntensityStats(mean=0.0, sd=0.0, median=0.0, p00_5=0.0, p99_5=0.0, voxels=0)
    p = np.percentile(values, [0.5, 50, 99.5])
    return IntensityStats(mean=round(float(values.mean()), 4), sd=round(float(values.std()), 4),
                          median=round(float(p[1]), 4), p00_5=round(float(p[0]), 4), p99_5=round(float(p[2]), 4),
                          voxels=int(values.size))


def describe(fp: Fingerprint) -> dict[str, Any]:
    """The fingerprint in a few figures (what the plan's table shows)."""
    sp = np.asarray(fp.spacings)
    return {"fingerprint": fp.digest(), "volumes": len(fp.volumes),
            "median spacing (x, y, z) mm": [round(float(v), 3) for v in np.median(sp, axis=0)],
            "median shape (z, y, x)": [int(v) for v in np.median(np.asarray(fp.shapes), axis=0)],
            "class voxels": fp.class_voxels,
            **{f"{m} foreground": f"mean {s.mean:.1f}, sd {s.sd:.1f}, 0.5-99.5 % [{s.p00_5:.1f}, {s.p99_5:.1f}]"
               for m, s in fp.intensity.items()}}
