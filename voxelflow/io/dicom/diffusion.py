"""Diffusion encoding of a DWI volume: a b-value and a direction for each time point, as the
header scan read them (standard attributes or the vendor's, see :mod:`.vendor`), and the FSL
``.bval`` / ``.bvec`` files that tools expect beside the exported NIfTI.

Directions are kept in DICOM's patient frame (LPS) in the store, which does not depend on how
an image is later written; :func:`fsl_bvecs` turns them into the voxel frame of one exported
image (FSL's convention: components along the voxel axes, the first negated when the image's
affine has a positive determinant, as FSL assumes radiological storage).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def plan_diffusion(files: list[dict[str, Any]], timepoints: int) -> dict[str, list] | None:
    """``{"b_values": [...], "directions_lps": [[x, y, z], ...]}``, one entry per time point of a
    stack whose records are time-major (``timepoints`` blocks), or None when its images carry
    no b-value. A time point's value is that of its first image (series assembly has checked
    that the images of one time point agree)."""
    per = len(files) // max(timepoints, 1)
    firsts = [files[k * per] for k in range(max(timepoints, 1))]
    if not any(f.get("b_value") for f in firsts):
        return None  # no diffusion weighting (GE writes b = 0 into every fMRI image)
    return {"b_values": [float(f.get("b_value") or 0.0) for f in firsts],
            "directions_lps": [[float(v) for v in (f.get("gradient") or [0.0, 0.0, 0.0])] for f in firsts]}


def fsl_bvecs(directions_lps: list[list[float]], affine: np.ndarray) -> np.ndarray:
    """``(3, n)`` FSL bvecs of directions (patient frame, LPS; lengths kept as the scanner
    wrote them) for an image with this RAS affine (voxel index ``(i, j, k)`` -> mm)."""
    m = np.asarray(affine, float)[:3, :3]
    world = _LPS_TO_RAS @ np.asarray(directions_lps, float).T
    vox = _frame(m).T @ world
    if np.linalg.det(m) > 0:
        vox[0] = -vox[0]
    return vox


def world_directions(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`fsl_bvecs`, in RAS: ``(3, n)`` world directions of FSL bvecs."""
    m = np.asarray(affine, float)[:3, :3]
    vox = np.array(bvecs, float)
    if np.linalg.det(m) > 0:
        vox[0] = -vox[0]
    return _frame(m) @ vox


def _frame(m: np.ndarray) -> np.ndarray:
    """The orthonormal voxel frame of an affine's 3x3 part, as columns: its first axis, its
    second made orthogonal to it, and their cross product on the side of the third. The
    slice axis of a stack follows its slice positions, which can lean from the normal by a
    rounding error (or a gantry tilt); directions are given relative to the slice plane and
    its normal, as the scanner and dcm2niix give them."""
    a0 = m[:, 0] / np.linalg.norm(m[:, 0])
    a1 = m[:, 1] - (m[:, 1] @ a0) * a0
    a1 /= np.linalg.norm(a1)
    a2 = np.cross(a0, a1)
    return np.column_stack([a0, a1, a2 if a2 @ m[:, 2] >= 0 else -a2])


def write_fsl(diffusion: dict[str, list], affine: np.ndarray, stem: str) -> tuple[str, str]:
    """Write ``stem.bval`` and ``stem.bvec`` (one row per component, as dcm2niix and FSL
    write them); returns their paths."""
    bvecs = fsl_bvecs(diffusion["directions_lps"], affine)
    bval, bvec = f"{stem}.bval", f"{stem}.bvec"
    with open(bval, "w") as fh:
        fh.write(" ".join(f"{b:g}" for b in diffusion["b_values"]) + "\n")
    with open(bvec, "w") as fh:
        fh.write("".join(" ".join(f"{v:.6g}" for v in row) + "\n" for row in bvecs))
    return bval, bvec
