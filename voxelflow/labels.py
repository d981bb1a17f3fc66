"""Labels in the store: segmentations as OME-Zarr ``labels/`` of their volume, per-volume
classes and a patient-level split, all recorded in the catalog.

* :func:`import_segmentations` reads a manifest (``image,segmentation[,name]``: the image is a
  DICOM SeriesInstanceUID or ``nifti:<path relative to its source root>``; the segmentation a
  NIfTI label map or a DICOM-SEG). Each segmentation is checked against its volume's grid:
  the same voxel centres (within ``tol_mm``, any axis order or flip) are mapped exactly;
  another grid covering most of the image is resampled nearest-neighbour with a recorded
  warning; anything else is a :class:`~voxelflow.errors.LabelError` naming the file.
* :func:`import_classes` joins per-series classes (``series_instance_uid,label``) into
  ``catalog/classes.parquet``. Original UIDs are only used to find volumes (through their keyed
  pseudonyms) and are never stored.
* :func:`make_split` assigns whole patients to train/validation/test, stratified by class and
  seeded (``catalog/splits.parquet``).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow as pa

from voxelflow import catalog
from voxelflow.deid import pseudonym
from voxelflow.errors import LabelError, SettingError
from voxelflow.geometry import LPS_TO_RAS, voxel_sizes
from voxelflow.store import open_label, open_volume, write_label

LABEL_SCHEMA, CLASS_SCHEMA, SPLIT_SCHEMA = catalog.LABEL_SCHEMA, catalog.CLASS_SCHEMA, catalog.SPLIT_SCHEMA

# (x, y, z) index order <-> (z, y, x) array order
_REVERSE = np.eye(4)[[2, 1, 0, 3]]


# ----------------------------------------------------------------------------- reading


def read_segmentation(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """A label map as ``(labels (z, y, x), RAS affine of (x, y, z), properties)``.

    Raises:
        LabelError: unreadable file or non-integer values.
    """
    path = Path(path)
    name = path.name
    try:
        if name.lower().endswith((".nii", ".nii.gz")):
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
            while data.ndim > 3 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise LabelError(name, f"label map must be 3-D, got shape {data.shape}")
            if data.dtype.kind == "f":
                if not np.array_equal(data, np.round(data)) or data.min() < 0:
                    raise LabelError(name, "label map holds non-integer or negative values")
            data = np.transpose(data, (2, 1, 0))
            properties: list[dict[str, Any]] = []
        else:
            import highdicom as hd

            seg = hd.seg.segread(path)
            vol = seg.get_volume(combine_segments=True, relabel=False)
            data = vol.array  # (axis0, axis1, axis2) = array order; its affine indexes that order
            affine = LPS_TO_RAS @ np.asarray(vol.affine, dtype=np.float64) @ _REVERSE
            properties = [{"label-value": int(d.SegmentNumber), "name": str(d.SegmentLabel)}
                          for d in seg.SegmentSequence]
    except LabelError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel/highdicom/pydicom raise many types
        raise LabelError(name, f"segmentation cannot be read ({type(exc).__name__}: {exc})") from None
    top = int(data.max()) if data.size else 0
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
    return np.ascontiguousarray(data.astype(dtype)), affine, properties


def map_to_grid(labels: np.ndarray, label_affine: np.ndarray, shape: tuple[int, int, int],
                image_affine: np.ndarray, *, where: str, tol_mm: float = 0.01,
                min_coverage: float = 0.5) -> tuple[np.ndarray, str, list[str]]:
    """Put a label map (z, y, x) on an image grid. Returns ``(labels, mapping, warnings)`` with
    mapping ``identical`` | ``reoriented`` (same voxel centres, exact) | ``resampled``
    (nearest neighbour, with a warning).

    Raises:
        LabelError: the label grid covers less than ``min_coverage`` of the image.
    """
    m_zyx, mapping, warnings = grid_mapping(labels.shape, label_affine, shape, image_affine, where=where,
                                            tol_mm=tol_mm, min_coverage=min_coverage)
    if m_zyx is None:
        return labels, mapping, warnings
    from scipy.ndimage import affine_transform

    out = affine_transform(labels, m_zyx[:3, :3], offset=m_zyx[:3, 3], output_shape=tuple(shape),
                           order=0, mode="constant", cval=0)
    return out, mapping, warnings


def grid_mapping(label_shape: tuple[int, ...], label_affine: np.ndarray, shape: tuple[int, int, int],
                 image_affine: np.ndarray, *, where: str, tol_mm: float = 0.01,
                 min_coverage: float = 0.5) -> tuple[np.ndarray | None, str, list[str]]:
    """How :func:`map_to_grid` maps a label grid onto an image grid, without the voxels:
    ``(m_zyx, mapping, warnings)``, ``m_zyx`` the 4x4 map from image array index (z, y, x) to
    label array index (None when the grids are identical). Apply it with scipy's
    ``affine_transform(order=0, mode="constant")`` or :func:`resample_nearest` (the same
    voxels, on any torch device).

    Raises:
        LabelError: the label grid covers less than ``min_coverage`` of the image.
    """
    label_shape = tuple(int(n) for n in label_shape)
    # index (x, y, z) of the image -> index (x, y, z) of the label
    m = np.linalg.inv(label_affine) @ image_affine
    lin, t = m[:3, :3], m[:3, 3]
    tol_vox = tol_mm / voxel_sizes(label_affine).min()
    exact = (np.all(np.abs(np.abs(lin) - np.round(np.abs(lin))) < tol_vox)
             and np.all(np.abs(np.round(lin)).sum(axis=0) == 1)
             and np.all(np.abs(t - np.round(t)) < tol_vox))
    # Coverage: the share of image voxel centres (sampled) that land inside the label array.
    grids = np.meshgrid(*(np.linspace(0, n - 1, min(n, 24)) for n in shape[::-1]), indexing="ij")
    pts = np.stack([g.ravel() for g in grids] + [np.ones(grids[0].size)])
    idx = (m @ pts)[:3]
    lab_xyz = np.array(label_shape[::-1])[:, None]
    coverage = float(np.mean(np.all((idx > -0.5) & (idx < lab_xyz - 0.5), axis=0)))
    if coverage < min_coverage:
        raise LabelError(where, f"segmentation grid covers {coverage:.0%} of the image "
                                f"(need {min_coverage:.0%}): it belongs to another image or its "
                                f"geometry is wrong (label shape {label_shape[::-1]}, image {tuple(shape)[::-1]})")
    if exact and np.allclose(lin, np.eye(3), atol=tol_vox) and np.allclose(t, 0, atol=tol_vox) \
            and label_shape == tuple(shape):
        return None, "identical", []
    m_zyx = _REVERSE @ m @ _REVERSE  # the same map in array (z, y, x) order
    warnings = []
    if coverage < 1.0:
        warnings.append(f"segmentation covers {coverage:.0%} of the image; the rest is background")
    if exact:
        return m_zyx, "reoriented", warnings
    worst = float(np.abs(m - np.round(m)).max())
    warnings.append(f"segmentation grid differs from the image grid (up to {worst:.3g} voxel); "
                    "resampled nearest-neighbour onto the image")
    return m_zyx, "resampled", warnings


def resample_nearest(labels, m_zyx: np.ndarray, shape: tuple[int, int, int], planes: int | None = None):
    """``scipy.ndimage.affine_transform(labels, m_zyx[:3, :3], offset=m_zyx[:3, 3],
    output_shape=shape, order=0, mode="constant", cval=0)`` as torch operations on the device
    that holds ``labels`` (a tensor; on a GPU a CT-sized map takes milliseconds where scipy
    takes seconds). The same voxels: each output index's label coordinate is computed in
    float64 in scipy's order of operations, rounded half up, and read where it lies within
    ``[0, n - 1]`` on every axis (background elsewhere). Output planes go ``planes`` at a time
    (default: about 2^22 voxels) to bound the coordinate buffers."""
    import torch

    dev = labels.device
    a, b = [[float(v) for v in row] for row in m_zyx[:3, :3]], [float(v) for v in m_zyx[:3, 3]]
    nz, ny, nx = (int(n) for n in shape)
    size = labels.shape
    flat = labels.reshape(-1)
    out = torch.zeros((nz, ny, nx), dtype=labels.dtype, device=dev)
    y = torch.arange(ny, dtype=torch.float64, device=dev)[:, None]
    x = torch.arange(nx, dtype=torch.float64, device=dev)[None, :]
    # per label axis h: ((a[h][0] * z + a[h][1] * y) + a[h][2] * x) + b[h], as scipy sums it
    ay = [a[h][1] * y for h in range(3)]
    ax = [a[h][2] * x for h in range(3)]
    planes = planes or max(1, (1 << 22) // max(1, ny * nx))
    for z0 in range(0, nz, planes):
        z = torch.arange(z0, min(nz, z0 + planes), dtype=torch.float64, device=dev)[:, None, None]
        index = None
        inside = None
        for h in range(3):
            c = ((a[h][0] * z + ay[h]) + ax[h]) + b[h]
            ok = (c >= 0) & (c <= size[h] - 1)
            i = torch.floor(c + 0.5).clamp_(0, size[h] - 1).long()
            index = i if index is None else index * size[h] + i
            inside = ok if inside is None else inside & ok
        out[z0:z0 + z.shape[0]] = torch.where(inside, flat[index], torch.zeros((), dtype=labels.dtype, device=dev))
    return out


# ----------------------------------------------------------------------------- resolving


def _volume_index(store: str | os.PathLike) -> tuple[dict[str, list[dict]], dict[str, str], dict[str, dict]]:
    """Volumes by series pseudonym, volume ids by source path, volumes by id (one catalog read)."""
    volumes = catalog.read_table(store, "volumes").to_pylist()
    by_series: dict[str, list[dict]] = defaultdict(list)
    for v in volumes:
        if v["series_id"]:
            by_series[v["series_id"]].append(v)
    files = catalog.read_table(store, "files").to_pylist()
    by_path = {r["path"]: r["volume_id"] for r in files if r["status"] == "converted"}
    return by_series, by_path, {v["volume_id"]: v for v in volumes}


def _candidates(image: str, key: bytes, by_series, by_path, volumes_by_id) -> list[dict]:
    if image.startswith("nifti:"):
        vid = by_path.get(image.removeprefix("nifti:"))
        return [volumes_by_id[vid]] if vid else []
    return by_series.get(pseudonym(key, "series", image), [])


def import_segmentations(store: str | os.PathLike, manifest: str | os.PathLike, key: bytes,
                         *, tol_mm: float = 0.01) -> tuple[list[dict], list[dict]]:
    """Attach the segmentations a manifest lists to their volumes (see the module docstring).

    Returns ``(label_rows, errors)``: the rows written to ``catalog/labels.parquet`` and, for
    each segmentation that could not be attached, ``{"segmentation", "reason"}``. Bad
    segmentations never stop the import.
    """
    manifest = Path(manifest)
    by_series, by_path, volumes_by_id = _volume_index(store)
    rows, errors = [], []
    sources = {(r["volume_id"], r["name"]): r["source"] for r in catalog.read_table(store, "labels").to_pylist()}
    with open(manifest, newline="") as fh:
        entries = list(csv.DictReader(fh))
    for entry in entries:
        seg_rel = entry["segmentation"]
        name = entry.get("name") or "segmentation"
        try:
            cands = _candidates(entry["image"], key, by_series, by_path, volumes_by_id)
            if not cands:
                raise LabelError(seg_rel, "no ingested volume matches its image (ingest the image first, "
                                          "or check the manifest's image column)")
            labels, affine, props = read_segmentation(manifest.parent / seg_rel)
            attached = None
            last_error: LabelError | None = None
            for vol in sorted(cands, key=lambda v: -int(np.prod(v["shape"]))):
                image = open_volume(store, vol["volume_id"])
                try:
                    mapped, mapping, warnings = map_to_grid(labels, affine, tuple(image.array.shape[-3:]),
                                                            image.affine, where=seg_rel, tol_mm=tol_mm)
                except LabelError as exc:
                    last_error = exc
                    continue
                attached = (vol["volume_id"], mapped, mapping, warnings)
                break
            if attached is None:
                raise last_error  # type: ignore[misc]
            vid, mapped, mapping, warnings = attached
            other = sources.get((vid, name))
            if other is not None and other != seg_rel:
                previous = open_label(store, vid, name)[...]
                if not np.array_equal(previous, mapped):
                    diff = int((previous != mapped).sum())
                    raise LabelError(seg_rel, f"conflicts with segmentation {other} of the same image, also "
                                              f"named {name!r} ({diff} voxels differ); give it another name")
                warnings = warnings + [f"identical to {other}, stored under the same name"]
            digest = write_label(store, vid, name, mapped, props or None)
            sources[(vid, name)] = seg_rel
            values, counts = np.unique(mapped, return_counts=True)
            rows.append({"volume_id": vid, "name": name, "source": seg_rel,
                         "format": "dicom-seg" if not seg_rel.lower().endswith((".nii", ".nii.gz")) else "nifti",
                         "values": [int(v) for v in values], "voxels": [int(c) for c in counts],
                         "mapping": mapping, "warnings": warnings, "digest": digest})
        except LabelError as exc:
            errors.append({"segmentation": seg_rel, "reason": exc.reason})
    catalog.upsert(store, "labels", rows, LABEL_SCHEMA, ("volume_id", "name", "source"))
    return rows, errors


def import_classes(store: str | os.PathLike, classes_csv: str | os.PathLike, key: bytes) -> tuple[list[dict], list[dict]]:
    """Join per-series classes (``series_instance_uid`` or ``image``, and ``label``) into
    ``catalog/classes.parquet``; every stack of a series gets its class. Returns
    ``(rows, errors)``."""
    by_series, by_path, volumes_by_id = _volume_index(store)
    rows, errors = [], []
    with open(classes_csv, newline="") as fh:
        for entry in csv.DictReader(fh):
            image = entry.get("series_instance_uid") or entry.get("image") or ""
            cands = _candidates(image, key, by_series, by_path, volumes_by_id)
            if not cands:
                errors.append({"image": "series " + pseudonym(key, "series", image) if image else "(empty)",
                               "reason": "no ingested volume matches"})
                continue
            rows += [{"volume_id": v["volume_id"], "label": entry["label"]} for v in cands]
    catalog.upsert(store, "classes", rows, CLASS_SCHEMA, ("volume_id",))
    return rows, errors


def _patients(patient_of: dict[str, str | None]) -> dict[str, list[str]]:
    """Patient key -> its volumes (a volume without a patient id is its own patient)."""
    patients: dict[str, list[str]] = defaultdict(list)
    for vid, pid in patient_of.items():
        patients[pid or f"volume:{vid}"].append(vid)
    return patients


def _strata(store: str | os.PathLike, patients: dict[str, list[str]]) -> dict[str, list[str]]:
    """Stratum -> patient keys (sorted): a patient's stratum is a class of its volumes other
    than the most frequent class of the catalog, else that class, else ``unlabelled``."""
    classes = {r["volume_id"]: r["label"] for r in catalog.read_table(store, "classes", CLASS_SCHEMA).to_pylist()}
    counts: dict[str, int] = defaultdict(int)
    for c in classes.values():
        counts[c] += 1
    common = max(counts, key=counts.get) if counts else None
    strata: dict[str, list[str]] = defaultdict(list)
    for pkey, vids in sorted(patients.items()):
        labels = {classes.get(v) for v in vids} - {None}
        strata[next(iter(sorted(labels - {common})), common or "") if labels else "unlabelled"].append(pkey)
    return strata


def make_folds(store: str | os.PathLike, folds: int, seed: int = 0, split: str = "train") -> dict[str, int]:
    """Volume id -> cross-validation fold (0 .. ``folds`` - 1) for the volumes of ``split``:
    whole patients per fold, stratified as the split is (each stratum's patients, shuffled
    with ``seed``, dealt round the folds, continuing where the previous stratum stopped so the
    folds stay equal in size). Deterministic for the split table and ``seed``."""
    rows = [r for r in catalog.read_table(store, "splits", SPLIT_SCHEMA).to_pylist() if r["split"] == split]
    patients: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        patients[r["patient_key"]].append(r["volume_id"])
    if len(patients) < folds:
        raise SettingError(f"{folds} folds need at least {folds} patients in the {split} split; "
                           f"{store} has {len(patients)}")
    rng = np.random.default_rng([seed, folds])
    out: dict[str, int] = {}
    dealt = 0
    for _, members in sorted(_strata(store, patients).items()):
        for i in rng.permutation(len(members)):
            for vid in patients[members[i]]:
                out[vid] = dealt % folds
            dealt += 1
    return out


def make_split(store: str | os.PathLike, seed: int = 0,
               fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), keep_existing: bool = False) -> list[dict]:
    """Assign every volume's patient to train / validation / test, stratified by class.

    Patients are the catalog's pseudonymous ``patient_id`` (a NIfTI volume without one is its
    own patient). A patient is positive for stratification if any of its volumes has a class
    other than the most frequent one. Written to ``catalog/splits.parquet``.

    With ``keep_existing`` patients already in the split keep their assignment and only new
    patients are drawn (stratified among themselves): what a pipeline that re-runs every night
    needs, so that no test patient of an earlier model ever moves into training.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise SettingError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    volumes = catalog.read_table(store, "volumes").to_pylist()
    patients = _patients({v["volume_id"]: v["patient_id"] for v in volumes})
    strata = _strata(store, patients)
    assignment: dict[str, str] = {}
    seeds: dict[str, int] = {}  # the seed that drew each patient
    if keep_existing:
        old = {r["patient_key"]: r for r in catalog.read_table(store, "splits", SPLIT_SCHEMA).to_pylist()}
        assignment = {k: r["split"] for k, r in old.items() if k in patients}
        seeds = {k: r["seed"] for k, r in old.items() if k in patients}
        strata = {k: [p for p in v if p not in assignment] for k, v in strata.items()}
        seed_text = hashlib.sha256(",".join(sorted(p for v in strata.values() for p in v)).encode()).hexdigest()
        rng = np.random.default_rng([seed, int(seed_text[:8], 16)])  # a new batch gets its own draw
    else:
        rng = np.random.default_rng(seed)
    for stratum in sorted(strata):
        members = [strata[stratum][i] for i in rng.permutation(len(strata[stratum]))]
        n = len(members)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        if n >= 3:  # every split sees every stratum when there are enough patients
            n_val, n_test = max(n_val, 1 if fractions[1] else 0), max(n_test, 1 if fractions[2] else 0)
        for i, pkey in enumerate(members):
            assignment[pkey] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    rows = [{"volume_id": vid, "patient_key": pkey, "split": assignment[pkey], "seed": seeds.get(pkey, seed)}
            for pkey, vids in patients.items() for vid in vids]
    catalog.write_table(store, "splits", pa.Table.from_pylist(rows, schema=SPLIT_SCHEMA).sort_by("volume_id"))
    return rows
