"""Export stored volumes as NIfTI with their exact world geometry."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from voxelflow import catalog
from voxelflow.store import open_volume


def export_volume(store: str | os.PathLike, volume_id: str, out_path: str | os.PathLike) -> Path:
    """Write one volume (level 0) as NIfTI-1; sform and qform both carry the stored affine."""
    vol = open_volume(store, volume_id)
    data = vol.to_nifti_order()
    img = nib.Nifti1Image(data, vol.affine)
    img.set_sform(vol.affine, code=1)  # scanner-based anatomical coordinates
    img.set_qform(vol.affine, code=1)
    if data.ndim == 4:
        zooms = list(img.header.get_zooms()[:3]) + [float(vol.time_step or 1.0)]
        img.header.set_zooms(zooms)
        img.header.set_xyzt_units("mm", "sec")
    else:
        img.header.set_xyzt_units("mm")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial.nii.gz" if out.name.endswith(".gz") else f".{out.name}.partial.nii")
    nib.save(img, tmp)
    os.replace(tmp, out)
    return out


def export_nifti(store: str | os.PathLike, outdir: str | os.PathLike,
                 volume_ids: list[str] | None = None) -> list[Path]:
    """Export volumes (all in the catalog by default) as ``OUTDIR/<volume_id>.nii.gz``."""
    ids = volume_ids or catalog.read_table(store, "volumes").column("volume_id").to_pylist()
    return [export_volume(store, vid, Path(outdir) / f"{vid}.nii.gz") for vid in ids]



def export_label(store: str | os.PathLike, volume_id: str, name: str, out_path: str | os.PathLike) -> Path:
    """Write a stored label map (e.g. a prediction) as NIfTI on its volume's exact grid."""
    from voxelflow.store import open_label

    vol = open_volume(store, volume_id)
    data = np.ascontiguousarray(np.transpose(open_label(store, volume_id, name)[...], (2, 1, 0)))
    img = nib.Nifti1Image(data, vol.affine)
    img.set_sform(vol.affine, code=1)
    img.set_qform(vol.affine, code=1)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, out)
    return out
