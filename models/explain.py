"""Explainability for classifiers: Grad-CAM maps (MONAI) over whole volumes, stored next to
the preprocessed volume they explain, with a QC image (the three planes through the map's
peak, in the style of the store's QC report, :mod:`voxelflow.qc`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from voxelflow import location, qc
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


def qc_image(image_zyx: np.ndarray, saliency_zyx: np.ndarray, path: str | Path, *,
             affine: np.ndarray | None = None, size: int = 256) -> Path:
    """The three orthogonal planes through the centre of the strongest response, side by side (``3 * size`` x
    ``size`` px), drawn as the store's QC report draws volumes (:mod:`voxelflow.qc`): anatomy
    in grey between its 1st and 99th percentiles, oriented and scaled by ``affine`` (RAS, index
    ``(x, y, z)``; without it the voxel axes are taken as RAS at 1 mm), and the map over it in
    inferno colours, its opacity proportional to its value, so the anatomy under a weak
    response stays visible."""
    from PIL import Image

    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    # the centre of the strongest response, not its first voxel: a slice classifier's map is a
    # plateau over each window, whose first voxel (argmax) is the window's corner, often in air
    strong = np.argwhere(saliency_zyx >= 0.9 * saliency_zyx.max())
    peak = tuple(int(round(v)) for v in strong.mean(axis=0))
    cuts = qc.orthogonal_cuts(affine, image_zyx.shape, centre_zyx=peak)
    planes = [c.take(image_zyx) for c in cuts]
    window = qc.display_window(None, planes)
    px_per_mm = qc.scale_for(image_zyx.shape, affine, size)
    strip = Image.new("RGB", (size * len(cuts), size))
    for k, (cut, plane) in enumerate(zip(cuts, planes)):
        strip.paste(qc.panel(plane, cut, window, px_per_mm, size, heat=cut.take(saliency_zyx)), (k * size, 0))
    location.save_png(strip, path)
    return location.path(path)


def explain_stored(store: str, pre_version: str, tag: str, model, patch_size, volume_id: str, class_index: int,
                   device: torch.device) -> tuple[Path, Path]:
    """Grad-CAM of one preprocessed volume, stored; returns (saliency store, QC image)."""
    root = location.path(store) / "preprocessed" / pre_version
    vol = open_volume(root, volume_id)
    data = np.ascontiguousarray(vol.array[...], dtype=np.float32)
    sal = gradcam_volume(model, torch.from_numpy(data)[None, None].to(device), patch_size, class_index)
    out = store_saliency(root, tag, volume_id, sal, vol.affine)
    png = qc_image(data, sal, out / f"{volume_id}.png", affine=vol.affine)
    return out, png
