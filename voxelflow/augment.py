"""Augmentation with replayable parameters, offline (stored copies) or on the fly.

As in TorchIO, parameters are sampled first (:func:`sample_params`, plain JSON) and then
applied deterministically (:func:`apply`) with MONAI's transforms, to the image and its label
together: spatial transforms move both (image bilinear, label nearest), intensity transforms
touch the image only. Storing the parameters next to each augmented copy makes it replayable
exactly; the training loop uses the same two functions on the fly (:class:`OnTheFly`).
Offline copies are computed on the GPU when CUDA is present; on-the-fly augmentation runs on
the CPU, in the DataLoader workers (:class:`OnTheFly`).

Spatial: rotation, scaling, translation (one affine), flips, elastic deformation.
Intensity: Gaussian noise, gamma, bias field, contrast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from voxelflow import catalog, location
from voxelflow.store import open_label, open_volume, write_label, write_volume

AUGMENT_VERSION = 1
AUGMENTED_SCHEMA = pa.schema([
    ("augmented_id", pa.string()), ("source_volume", pa.string()), ("copy", pa.int64()),
    ("params", pa.string()), ("digest", pa.string()), ("label_digest", pa.string()),
])


class AugmentConfig(BaseModel):
    """Ranges the parameters are drawn from, and how many copies to make."""

    model_config = ConfigDict(frozen=True)

    rotate_deg: float = 15.0  # each axis, uniform in [-r, r]
    scale: tuple[float, float] = (0.85, 1.15)
    translate_vox: float = 5.0
    flip_prob: float = 0.5  # per axis
    elastic_prob: float = 0.2
    elastic_sigma: tuple[float, float] = (5.0, 7.0)
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    noise_std: tuple[float, float] = (0.0, 0.05)
    gamma: tuple[float, float] = (0.7, 1.5)
    bias_prob: float = 0.3
    bias_coeff: float = 0.1  # MONAI's default range; larger values swamp small patches
    contrast: tuple[float, float] = (0.75, 1.25)

    def version(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump() | {"code": AUGMENT_VERSION},
                                         sort_keys=True).encode()).hexdigest()[:12]


class OfflineConfig(BaseModel):
    """An offline run: which preprocessed copy, how many augmented copies per volume."""

    model_config = ConfigDict(frozen=True)

    store: str
    version: str  # the preprocessed copy to augment
    copies: int = Field(2, ge=1)
    seed: int = 0
    split: str | None = "train"
    label_name: str = "segmentation"
    augment: AugmentConfig = AugmentConfig()


def sample_params(config: AugmentConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Draw one set of parameters (JSON-able) from ``config``'s ranges."""
    u = rng.uniform
    return {
        "rotate": [float(np.radians(u(-config.rotate_deg, config.rotate_deg))) for _ in range(3)],
        "scale": [float(u(*config.scale)) for _ in range(3)],
        "translate": [float(u(-config.translate_vox, config.translate_vox)) for _ in range(3)],
        "flip": [axis for axis in range(3) if rng.random() < config.flip_prob],
        "elastic": ({"seed": int(rng.integers(2**31)), "sigma": float(u(*config.elastic_sigma)),
                     "magnitude": float(u(*config.elastic_magnitude))}
                    if rng.random() < config.elastic_prob else None),
        "noise": {"seed": int(rng.integers(2**31)), "std": float(u(*config.noise_std))},
        "gamma": float(u(*config.gamma)),
        "bias": ({"seed": int(rng.integers(2**31)), "coeff": float(u(0, config.bias_coeff))}
                 if rng.random() < config.bias_prob else None),
        "contrast": float(u(*config.contrast)),
    }


def planar_params(params: dict[str, Any]) -> dict[str, Any]:
    """3-D parameters cut to the (y, x) plane of a ``(C, z, y, x)`` patch one slice deep: the
    rotation about the z axis, in-plane scale, translation and flips; no elastic deformation
    (MONAI's is 3-D). Intensity parameters are kept."""
    return dict(params, rotate=params["rotate"][:1], scale=params["scale"][1:], translate=params["translate"][1:],
                flip=[axis - 1 for axis in params["flip"] if axis > 0], elastic=None)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def apply(image: torch.Tensor, label: torch.Tensor | None, params: dict[str, Any],
          dev: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``params`` to a channel-first image ``(C, X, Y, Z)`` and its label (same grid),
    or to a 2-D ``(C, Y, X)`` one with :func:`planar_params`.

    Deterministic: the same inputs and parameters give the same output.
    """
    from monai.transforms import AdjustContrast, Affine, Flip, Rand3DElasticd, RandBiasField

    dev = dev or device()
    img = image.to(dev, torch.float32)
    lab = label.to(dev, torch.float32) if label is not None else None
    affine = dict(rotate_params=params["rotate"], scale_params=params["scale"],
                  translate_params=params["translate"], device=dev, image_only=True)
    if any(params["rotate"]) or any(s != 1 for s in params["scale"]) or any(params["translate"]):
        img = Affine(mode="bilinear", padding_mode="border", **affine)(img)
        if lab is not None:
            lab = Affine(mode="nearest", padding_mode="zeros", **affine)(lab)
    # else the identity: nothing to resample (MONAI's Affine costs ~2 ms a call in Python
    # overhead, most of an augmented slice's time)
    if params["flip"]:
        img = Flip(spatial_axis=params["flip"])(img)
        lab = Flip(spatial_axis=params["flip"])(lab) if lab is not None else None
    if params["elastic"]:
        e = params["elastic"]
        keys = ["image", "label"] if lab is not None else ["image"]
        elastic = Rand3DElasticd(keys=keys, sigma_range=(e["sigma"], e["sigma"]),
                                 magnitude_range=(e["magnitude"], e["magnitude"]), prob=1.0,
                                 mode=["bilinear", "nearest"][: len(keys)],
                                 padding_mode=["border", "zeros"][: len(keys)], device=dev)
        elastic.set_random_state(seed=e["seed"])
        out = elastic({"image": img, "label": lab} if lab is not None else {"image": img})
        img, lab = out["image"], out.get("label")
    img = torch.as_tensor(img)
    # intensity: image only
    lo, hi = img.min(), img.max()
    img = AdjustContrast(gamma=params["gamma"], retain_stats=True)(img)
    if params["bias"]:
        bias = RandBiasField(coeff_range=(params["bias"]["coeff"],) * 2, prob=1.0)
        bias.set_random_state(seed=params["bias"]["seed"])
        img = torch.as_tensor(bias(img))
    mean = img.mean()
    img = (img - mean) * params["contrast"] + mean
    gen = torch.Generator(device="cpu").manual_seed(params["noise"]["seed"])
    img = img + torch.randn(img.shape, generator=gen).to(dev) * params["noise"]["std"] * float(hi - lo)
    img = _plain(img).float()
    if lab is not None:
        lab = torch.round(_plain(lab)).to(torch.int64)
    return img, lab


def _plain(t) -> torch.Tensor:
    """A plain tensor (MONAI returns MetaTensors, which collate and pickle slower)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


class OnTheFly:
    """The same pipeline as a ZarrPatchDataset transform: parameters drawn per sample from
    ``seed`` and the sample's position, so a training run is reproducible.

    It runs on the CPU, also on a CUDA machine: DataLoader worker processes are forked from a
    process that has already initialised CUDA (the model is on the GPU), and CUDA cannot be
    used in such a child; and on one device for every worker count a sample is the same
    whether it is made in the main process or in a worker."""

    def __init__(self, config: AugmentConfig = AugmentConfig(), seed: int = 0):
        self.config, self.seed = config, seed

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        origin = [int(v) for v in item["origin"]]
        tag = int(hashlib.sha256(f"{item['volume_id']}{origin}".encode()).hexdigest()[:8], 16)
        params = sample_params(self.config, np.random.default_rng([self.seed, tag]))
        # patches are (C, z, y, x); MONAI's spatial axes order does not matter for random params
        if item["image"].shape[1] == 1:  # a slice (2-D classifier): in-plane transforms only
            params = planar_params(params)
            img, lab = apply(item["image"][:, 0], item["label"][:, 0] if item.get("label") is not None else None,
                             params, torch.device("cpu"))
            img, lab = img[:, None], (lab[:, None] if lab is not None else None)
        else:
            img, lab = apply(item["image"], item.get("label"), params, torch.device("cpu"))
        item = dict(item, image=img.cpu(), params=json.dumps(params))
        if lab is not None:
            item["label"] = lab.cpu()
        return item


# ----------------------------------------------------------------------------- offline


def output_root(config: OfflineConfig) -> Path:
    return location.path(config.store) / "preprocessed" / config.version / "augmented" / \
        hashlib.sha256(f"{config.augment.version()}|{config.seed}".encode()).hexdigest()[:12]


def augment_volume(config: OfflineConfig, volume_id: str, copy: int) -> dict[str, Any]:
    """Make one augmented copy of a preprocessed volume (and its label); returns its row."""
    src_root = location.path(config.store) / "preprocessed" / config.version
    tag = int(hashlib.sha256(volume_id.encode()).hexdigest()[:8], 16)
    params = sample_params(config.augment, np.random.default_rng([config.seed, tag, copy]))
    vol = open_volume(src_root, volume_id)
    image = torch.from_numpy(np.ascontiguousarray(vol.array[...]))[None]
    try:
        label = torch.from_numpy(open_label(src_root, volume_id, config.label_name)[...].astype(np.int64))[None]
    except (FileNotFoundError, KeyError, OSError):
        label = None
    img, lab = apply(image, label, params)
    aug_id = f"{volume_id}-aug{copy}"
    root = output_root(config)
    info = write_volume(root, aug_id, img[0].cpu().numpy(), vol.affine,
                        attributes={"source_volume": volume_id, "augment_params": params, "copy": copy})
    label_digest = None
    if lab is not None:
        label_digest = write_label(root, aug_id, config.label_name, lab[0].cpu().numpy().astype(np.uint8))
    return {"augmented_id": aug_id, "source_volume": volume_id, "copy": copy, "params": json.dumps(params),
            "digest": info.digest, "label_digest": label_digest}


def replay(config: OfflineConfig, augmented_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Recompute an augmented copy from its source and its stored parameters."""
    row = next(r for r in catalog.read_table(output_root(config), "augmented", AUGMENTED_SCHEMA).to_pylist()
               if r["augmented_id"] == augmented_id)
    src_root = location.path(config.store) / "preprocessed" / config.version
    vol = open_volume(src_root, row["source_volume"])
    image = torch.from_numpy(np.ascontiguousarray(vol.array[...]))[None]
    label = None
    if row["label_digest"]:
        label = torch.from_numpy(open_label(src_root, row["source_volume"], config.label_name)[...].astype(np.int64))[None]
    img, lab = apply(image, label, json.loads(row["params"]))
    return img[0].cpu().numpy(), (lab[0].cpu().numpy().astype(np.uint8) if lab is not None else None)


def plan(config: OfflineConfig) -> tuple[list[tuple[str, int]], int]:
    """The (volume, copy) pairs still to make, and how many exist already."""
    volumes = [r["volume_id"] for r in catalog.preprocessed_volumes(config.store, config.version, config.split or None)]
    existing = {(r["source_volume"], r["copy"]) for r in
                catalog.read_table(output_root(config), "augmented", AUGMENTED_SCHEMA).to_pylist()}
    todo = [(v, c) for v in sorted(volumes) for c in range(config.copies) if (v, c) not in existing]
    return todo, sum(1 for v in volumes for c in range(config.copies) if (v, c) in existing)


def write_catalog(config: OfflineConfig, rows: list[dict]) -> None:
    catalog.upsert(output_root(config), "augmented", rows, AUGMENTED_SCHEMA, ("augmented_id",))


def run_local(config: OfflineConfig) -> dict[str, Any]:
    todo, existing = plan(config)
    rows = [augment_volume(config, v, c) for v, c in todo]
    write_catalog(config, rows)
    return {"output": str(output_root(config)), "made": len(rows), "existing": existing}
