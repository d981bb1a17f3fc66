"""Explainability for classifiers: Grad-CAM maps (MONAI) over whole volumes, stored next to
the preprocessed volume they explain, with a QC image (the slice through the map's peak)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from voxelflow import location
from voxelflow.store import open_volume, write_volume
from models.networks import Planar


def gradcam_volume(model, image: torch.Tensor, patch_size, class_index: int, target_layer: str = "layer4") -> np.ndarray:
    """Grad-CAM of ``class_index`` over a ``(1, 1, z, y, x)`` volume, window by window
    (non-overlapping patches, as classification inference sees it); ``(z, y, x)`` in [0, 1].
    A slice classifier (:class:`models.networks.Planar`) is explained slice by slice with its
    2-D network's maps."""
    from monai.visualize import GradCAM

    members = getattr(model, "members", None)
    if members is not None:  # an ensemble (models.ensemble): the mean of its members' maps
        mean = np.mean([gradcam_volume(m, image, patch_size, class_index, target_layer) for m in members], 0)
        top = mean.max()
        return mean / top if top > 0 else mean
    planar = isinstance(model, Planar)
    cam = GradCAM(nn_module=model.net if planar else model, target_layers=target_layer)
    z, y, x = image.shape[-3:]
    pz, py, px = patch_size
    out = np.zeros((z, y, x), np.float32)
    pad = [(0, 0), (0, 0)] + [(0, (-n) % p) for n, p in zip((z, y, x), patch_size)]
    padded = torch.from_numpy(np.pad(image.cpu().numpy(), pad)).to(image.device)
    with torch.enable_grad():
        for a in range(0, z, pz):
            for b in range(0, y, py):
                for c in range(0, x, px):
                    window = padded[..., a:a + pz, b:b + py, c:c + px].clone().requires_grad_(True)
                    m = cam(x=window[:, :, 0] if planar else window, class_idx=class_index)[0, 0]
                    m = m.detach().cpu().numpy().reshape(pz, py, px)
                    out[a:a + pz, b:b + py, c:c + px] = m[: min(pz, z - a), : min(py, y - b), : min(px, x - c)]
    top = out.max()
    return out / top if top > 0 else out


def store_saliency(root: str | Path, tag: str, volume_id: str, saliency: np.ndarray, affine: np.ndarray) -> Path:
    """Write a saliency map as ``<root>/saliency/<tag>/volumes/<volume_id>`` (same grid as the
    preprocessed volume ``root`` holds)."""
    out = location.path(root) / "saliency" / tag
    write_volume(out, volume_id, saliency.astype(np.float32), affine, attributes={"kind": "gradcam"})
    return out


def qc_image(image_zyx: np.ndarray, saliency_zyx: np.ndarray, path: str | Path) -> Path:
    """The slice through the saliency peak: image in grey, saliency in red."""
    from PIL import Image

    k = int(np.unravel_index(int(saliency_zyx.argmax()), saliency_zyx.shape)[0])
    img = image_zyx[k].astype(np.float32)
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip((img - lo) / ((hi - lo) or 1.0), 0, 1)
    rgb = np.stack([grey, grey, grey], -1)
    rgb[..., 0] = np.clip(grey * 0.6 + saliency_zyx[k] * 0.8, 0, 1)
    pil = Image.fromarray((rgb * 255).astype(np.uint8))
    pil = pil.resize((pil.width * 3, pil.height * 3), Image.NEAREST)
    location.save_png(pil, path)
    return location.path(path)


def explain_stored(store: str, pre_version: str, tag: str, model, patch_size, volume_id: str, class_index: int,
                   device: torch.device) -> tuple[Path, Path]:
    """Grad-CAM of one preprocessed volume, stored; returns (saliency store, QC image)."""
    root = location.path(store) / "preprocessed" / pre_version
    vol = open_volume(root, volume_id)
    data = np.ascontiguousarray(vol.array[...], dtype=np.float32)
    sal = gradcam_volume(model, torch.from_numpy(data)[None, None].to(device), patch_size, class_index)
    out = store_saliency(root, tag, volume_id, sal, vol.affine)
    png = qc_image(data, sal, out / f"{volume_id}.png")
    return out, png
