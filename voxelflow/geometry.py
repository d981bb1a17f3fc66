"""Voxel-to-world geometry.

Conventions used throughout voxelflow:

* World space is RAS+ in millimetres (NIfTI's convention). DICOM's LPS+ patient coordinates
  are converted by negating x and y.
* An affine maps a voxel index ``(i, j, k, 1)`` to world ``(x, y, z, 1)``, where ``i`` is the
  fastest-varying image axis (DICOM column, NIfTI first axis). Arrays in the store are kept in
  OME-NGFF order ``(z, y, x)`` = ``(k, j, i)``; the affine's index order is always ``(i, j, k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dicom_affine(
    orientation: Sequence[float],
    position: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_step: Sequence[float],
) -> np.ndarray:
    """RAS affine of a DICOM stack.

    Args:
        orientation: ImageOrientationPatient (row direction cosine, then column direction).
        position: ImagePositionPatient of the first slice of the stack (LPS, mm).
        pixel_spacing: PixelSpacing as DICOM orders it: (between rows, between columns).
        slice_step: LPS vector (mm) from one slice's position to the next one's. For a gantry
            tilt it is not parallel to the slice normal and the affine is sheared, which is the
            true geometry.

    Returns:
        4x4 float64 affine from (column, row, slice) indices to RAS mm.
    """
    row_cos = np.asarray(orientation[:3], dtype=np.float64)
    col_cos = np.asarray(orientation[3:6], dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * float(pixel_spacing[1])
    lps[:3, 1] = col_cos * float(pixel_spacing[0])
    lps[:3, 2] = np.asarray(slice_step, dtype=np.float64)
    lps[:3, 3] = np.asarray(position, dtype=np.float64)
    return LPS_TO_RAS @ lps


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane (row cosine x column cosine), LPS."""
    row_cos = np.asarray(orientation[:3], dtype=np.float64)
    col_cos = np.asarray(orientation[3:6], dtype=np.float64)
    n = np.cross(row_cos, col_cos)
    return n / np.linalg.norm(n)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Length of each index axis in mm (i, j, k)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def orientation_code(affine: np.ndarray) -> str:
    """Three-letter axis code, e.g. ``"LPS"``: where each index axis (i, j, k) points."""
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(np.asarray(affine)))


def shear_angle_deg(affine: np.ndarray) -> float:
    """Angle (degrees) between the slice axis and the normal of the in-plane axes; 0 unless
    the stack is sheared (gantry tilt)."""
    m = np.asarray(affine)[:3, :3]
    n = np.cross(m[:, 0], m[:, 1])
    n /= np.linalg.norm(n)
    k = m[:, 2] / np.linalg.norm(m[:, 2])
    return float(np.degrees(np.arccos(min(1.0, abs(float(n @ k))))))


def level_affine(affine: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Affine of a pyramid level made by averaging blocks of ``factors`` voxels (i, j, k).

    The centre of level voxel 0 is the centre of the block of base voxels it averages, hence
    the half-voxel shift.
    """
    f = np.asarray(factors, dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = (f - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale
