"""Preprocessing: a versioned, learning-ready copy of stored volumes and their labels.

Per volume (MONAI transforms on the volume and its label together):
reorient to RAS, resample to a target spacing (image linear or spline, label nearest), crop
to the foreground (body for CT, head for MR) with a margin, normalise intensities (CT: window
then scale to [0, 1]; MR: z-score over the foreground, or percentiles). Like nnU-Net, each
volume's voxel locations per label class are sampled and kept, so a patch sampler can find
foreground without reading the volume.

The copy lives in ``STORE/preprocessed/<version>/`` (a store of its own: ``volumes/``,
``catalog/``), where ``version`` is a digest of the configuration. Running the same
configuration again does no work for volumes whose source (voxels and label) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from voxelflow import catalog, location
from voxelflow.errors import InvalidInputError, StoreError
from voxelflow.fingerprint import target_spacing
from voxelflow.geometry import orientation_code, voxel_sizes
from voxelflow.store import open_label, open_volume, write_label, write_volume

PREPROCESS_VERSION = 1  # bump when the processing below changes its output

PREPROCESSED_SCHEMA, LOCATION_SCHEMA = catalog.PREPROCESSED_SCHEMA, catalog.LOCATION_SCHEMA


class PreprocessConfig(BaseModel):
    """How to preprocess. Everything except ``store`` and ``volumes`` defines the version."""

    model_config = ConfigDict(frozen=True)

    store: str
    volumes: list[str] | None = Field(None, description="volume ids (default: every 3-D volume)")
    labelled_only: bool = Field(False, description="only volumes that have the label `label_name`")
    spacing: tuple[float, float, float] | None = Field(
        None, description="target (x, y, z) mm; default: the median spacing of the selected volumes "
                          "(10th percentile on a much coarser axis)")
    interpolation: Literal["linear", "spline"] = "linear"
    ct_window: tuple[float, float] = (-160.0, 240.0)
    mr_normalization: Literal["zscore", "percentile"] = "zscore"
    crop_foreground: bool = True
    margin_mm: float = 10.0
    label_name: str = "segmentation"
    samples_per_class: int = Field(10000, ge=1)
    seed: int = 0

    def version(self) -> str:
        params = self.model_dump(exclude={"store", "volumes", "labelled_only"}) | {"code": PREPROCESS_VERSION}
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def output_root(config: PreprocessConfig) -> Path:
    return location.path(config.store) / "preprocessed" / config.version()


def resolve(config: PreprocessConfig) -> PreprocessConfig:
    """Fill in the defaults that depend on the data: the volume selection (3-D volumes) and
    the target spacing (median of the selection, the 10th percentile on a much coarser axis:
    nnU-Net's rule, ``voxelflow.fingerprint.target_spacing``)."""
    volumes = catalog.read_table(config.store, "volumes").to_pylist()
    chosen = [v for v in volumes if len(v["shape"]) == 3 and (config.volumes is None or v["volume_id"] in config.volumes)]
    if config.labelled_only:
        labelled = {r["volume_id"] for r in catalog.read_table(config.store, "labels").to_pylist()
                    if r["name"] == config.label_name}
        chosen = [v for v in chosen if v["volume_id"] in labelled]
    spacing = config.spacing
    if spacing is None:
        if not chosen:
            raise InvalidInputError(config.store, "no 3-D volume to preprocess")
        spacing = target_spacing([v["spacing"] for v in chosen], [v["shape"] for v in chosen])
    return config.model_copy(update={"volumes": sorted(v["volume_id"] for v in chosen), "spacing": spacing})


def _transforms(config: PreprocessConfig, modality: str | None, has_label: bool):
    from monai.transforms import (
        Compose,
        CropForegroundd,
        NormalizeIntensityd,
        Orientationd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    keys = ["image", "label"] if has_label else ["image"]
    modes = ("bilinear" if config.interpolation == "linear" else 3, "nearest")[: len(keys)]
    steps = [Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
             Spacingd(keys=keys, pixdim=config.spacing, mode=modes, padding_mode="border")]
    ct = (modality or "").upper() == "CT"
    if config.crop_foreground:
        margin = [int(np.ceil(config.margin_mm / s)) for s in config.spacing]
        if ct:
            select = _ct_body
        else:
            select = _mr_head
        steps.append(CropForegroundd(keys=keys, source_key="image", select_fn=select, margin=margin,
                                     allow_smaller=True))
    if ct:
        lo, hi = config.ct_window
        steps.append(ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    elif config.mr_normalization == "zscore":
        steps.append(NormalizeIntensityd(keys="image", nonzero=True))
    else:
        steps.append(ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                                     clip=True))
    return Compose(steps)


def _ct_body(x):
    return x > -500  # soft tissue and bone; air and lungs outside


def _mr_head(x):
    return x > 0.1 * float(np.percentile(np.asarray(x), 99))


def sample_locations(labels_zyx: np.ndarray, n: int, seed: int, volume_id: str) -> list[dict]:
    """Up to ``n`` voxel locations (z, y, x) per label value > 0, sampled without replacement."""
    rng = np.random.default_rng([seed, int(hashlib.sha256(volume_id.encode()).hexdigest()[:8], 16)])
    rows = []
    for value in np.unique(labels_zyx):
        if value == 0:
            continue
        where = np.argwhere(labels_zyx == value)
        if len(where) > n:
            where = where[np.sort(rng.choice(len(where), size=n, replace=False))]
        rows += [{"volume_id": volume_id, "label": int(value), "z": int(z), "y": int(y), "x": int(x)}
                 for z, y, x in where]
    return rows


def preprocess_volume(config: PreprocessConfig, volume: dict[str, Any], label_digest: str | None
                      ) -> dict[str, Any]:
    """Preprocess one catalog volume into ``output_root(config)``: the volume, its label and
    its sampled locations (``locations/<volume_id>.parquet``). Returns its catalog row; bad
    input comes back as a row with status ``failed``."""
    import torch
    from monai.data import MetaTensor

    vid = volume["volume_id"]
    base = {"volume_id": vid, "source_digest": volume["digest"], "label_digest": label_digest,
            "modality": volume["modality"], "reason": None}
    try:
        vol = open_volume(config.store, vid)
        affine = torch.from_numpy(vol.affine)
        image = vol.array[...]
        if image.ndim != 3:
            raise InvalidInputError(vid, f"{image.ndim}-D volume; preprocessing takes 3-D volumes")
        data = {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(
            np.transpose(image, (2, 1, 0)))[None].astype(np.float32)), affine=affine)}
        has_label = label_digest is not None
        if has_label:
            label = open_label(config.store, vid, config.label_name)[...]
            data["label"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(
                np.transpose(label, (2, 1, 0)))[None].astype(np.float32)), affine=affine)
        out = _transforms(config, volume["modality"], has_label)(data)
    except StoreError:
        raise
    except InvalidInputError as exc:
        return base | {"status": "failed", "reason": exc.reason}
    new_affine = np.asarray(out["image"].affine, dtype=np.float64)
    img = np.ascontiguousarray(np.transpose(out["image"][0].numpy(), (2, 1, 0))).astype(np.float32)
    root = output_root(config)
    info = write_volume(root, vid, img, new_affine, attributes={
        "source_volume": vid, "source_digest": volume["digest"], "preprocess_version": config.version(),
        "modality": volume["modality"]})
    locations: list[dict] = []
    classes: list[int] = []
    if has_label:
        lab = np.rint(np.transpose(out["label"][0].numpy(), (2, 1, 0))).astype(np.uint8)
        write_label(root, vid, config.label_name, np.ascontiguousarray(lab))
        classes = [int(v) for v in np.unique(lab) if v]
        locations = sample_locations(lab, config.samples_per_class, config.seed, vid)
    catalog.write_table(root, f"locations/{vid}", pa.Table.from_pylist(locations, schema=LOCATION_SCHEMA))
    return base | {"status": "done", "shape": list(img.shape), "spacing": [float(v) for v in voxel_sizes(new_affine)],
                   "affine": new_affine.ravel().tolist(), "orientation": orientation_code(new_affine),
                   "classes": classes, "digest": info.digest}


def plan(config: PreprocessConfig) -> tuple[list[dict], list[dict]]:
    """Split the (resolved) selection into volumes to process and volumes already done with
    the same source voxels and label. Returns ``(todo, done_rows)``; each todo item is
    ``{"volume": catalog row, "label_digest": str | None}``."""
    volumes = {v["volume_id"]: v for v in catalog.read_table(config.store, "volumes").to_pylist()}
    labels = {r["volume_id"]: r["digest"] for r in catalog.read_table(config.store, "labels").to_pylist()
              if r["name"] == config.label_name}
    previous = {r["volume_id"]: r for r in catalog.read_table(output_root(config), "preprocessed",
                                                                PREPROCESSED_SCHEMA).to_pylist()}
    todo, done = [], []
    for vid in config.volumes or []:
        vol, label_digest = volumes[vid], labels.get(vid)
        prev = previous.get(vid)
        if prev and prev["status"] == "done" and prev["source_digest"] == vol["digest"] \
                and prev["label_digest"] == label_digest \
                and (output_root(config) / "volumes" / vid).exists():
            done.append(prev)
        else:
            todo.append({"volume": vol, "label_digest": label_digest})
    return todo, done


def write_catalog(config: PreprocessConfig, rows: list[dict]) -> None:
    root = output_root(config)
    catalog.upsert(root, "preprocessed", rows, PREPROCESSED_SCHEMA, ("volume_id",))
    text = json.dumps(config.model_dump(exclude={"volumes", "store", "labelled_only"}), indent=2)
    path = root / "config.json"
    if not path.exists() or path.read_text() != text:  # an unchanged rerun writes nothing
        path.write_text(text)


def run_local(config: PreprocessConfig) -> dict[str, Any]:
    """Preprocess in this process (the reference for the flow)."""
    config = resolve(config)
    todo, done = plan(config)
    rows = [preprocess_volume(config, item["volume"], item["label_digest"]) for item in todo]
    write_catalog(config, rows)
    return summarize(config, rows, done)


def summarize(config: PreprocessConfig, rows: list[dict], done: list[dict]) -> dict[str, Any]:
    return {"output": str(output_root(config)), "version": config.version(), "spacing": list(config.spacing or ()),
            "processed": sum(r["status"] == "done" for r in rows), "failed": sum(r["status"] == "failed" for r in rows),
            "unchanged": len(done), "failures": [(r["volume_id"], r["reason"]) for r in rows if r["status"] == "failed"]}


def locations_for(root: str | os.PathLike, volume_id: str) -> dict[int, np.ndarray]:
    """Sampled ``(z, y, x)`` locations of one preprocessed volume, per label value > 0."""
    table = catalog.read_table(root, f"locations/{volume_id}", LOCATION_SCHEMA)
    labels = table.column("label").to_numpy()
    zyx = np.stack([table.column(c).to_numpy() for c in ("z", "y", "x")], axis=1) if table.num_rows \
        else np.zeros((0, 3), np.int32)
    return {int(v): zyx[labels == v] for v in np.unique(labels)}
