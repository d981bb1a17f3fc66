"""Gantry tilt: a sheared CT stack resampled onto an orthogonal grid, as dcm2niix's ``_Tilt``
output is.

voxelflow stores a stack acquired with gantry tilt with its exact, sheared affine (every slice
where its ImagePositionPatient says, see :func:`voxelflow.geometry.dicom_affine`). Tools that
cannot express shear need the stack resampled so that its slice axis is perpendicular to the
slice plane; :func:`resample_orthogonal` makes that copy the way dcm2niix makes its ``_Tilt``
file (``nii_saveNII3Dtilt`` in dcm2niix's ``console/nii_dicom_batch.cpp``): each slice stays
in its plane and is only shifted, by linear interpolation along the one in-plane axis the
shear runs along, onto a grid that keeps slice 0's voxels and grows along that axis by as many
whole voxels as the shear moves the last slice, the new voxels holding the darkest value of
the stack. A shear that is not a single-axis gantry tilt raises
:class:`~voxelflow.errors.UnsupportedDataError`.
"""

from __future__ import annotations

import math

import numpy as np

from voxelflow.errors import UnsupportedDataError
from voxelflow.geometry import shear_angle_deg

# Below this angle a stack counts as unsheared: positions written with 4 decimals (as DS
# strings often are) leave thousandths of a degree of apparent shear in a straight stack.
NO_SHEAR_DEG = 0.01
# In-plane axes further from perpendicular than this (cosine) are an in-plane shear, which no
# scanner writes and a slice shift cannot undo.
IN_PLANE_COS_TOL = 1e-4
# Index positions this close to a whole voxel are taken as on it, so that float error in the
# shear cannot push a sample on the data's edge just outside and turn it into fill.
SNAP = 1e-6


def resample_orthogonal(data: np.ndarray, affine: np.ndarray, order: int = 1, *,
                        fill: float | None = None, where: str = "stack") -> tuple[np.ndarray, np.ndarray]:
    """Resample a gantry-tilted (sheared) stack onto an orthogonal grid, as dcm2niix's ``_Tilt``.

    The output keeps the input's in-plane axes and slice positions along the normal; its slice
    axis is the slice normal times the perpendicular slice spacing. Along the in-plane axis the
    shear runs along it has ``ceil(|shift| * (slices - 1))`` more voxels (``shift``: voxels the
    shear moves each slice), added on the side the slices move to; when they move towards lower
    indices the origin moves with them. Each slice is resampled within its own plane only, so
    no value mixes two slices.

    Args:
        data: ``(z, y, x)`` voxels (slice, row, column), or ``(t, z, y, x)``: each time point is
            resampled alike.
        affine: 4x4 affine from ``(x, y, z)`` = ``(column, row, slice)`` indices to world mm.
        order: 1 for linear interpolation (what dcm2niix uses), 0 for nearest neighbour.
        fill: value of output voxels no slice covers. By default the darkest value of ``data``
            (over all time points), which is dcm2niix's choice when a file has no
            PixelPaddingValue (air, or the padding outside the scan circle, in a CT).
        where: the series or file named in an error.

    Returns:
        ``(resampled, affine)``. Integer data comes back in its dtype, rounded half away from
        zero (as dcm2niix's C ``round``) and clipped to the dtype's range; float data in its
        dtype. An unsheared stack (shear below 0.01 degrees) comes back unchanged: the same
        ``data`` and ``affine`` objects.

    Raises:
        UnsupportedDataError: the shear is not a gantry tilt a slice shift can undo: the slice
            axis leans along both in-plane axes, lies in the image plane, or the in-plane axes
            are not perpendicular.
        ValueError: ``data`` is not 3-D or 4-D, ``affine`` not 4x4, or ``order`` not 0 or 1.
    """
    arr = np.asarray(data)
    aff = np.asarray(affine, dtype=np.float64)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected (z, y, x) or (t, z, y, x) data, got shape {arr.shape}")
    if aff.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {aff.shape}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    if shear_angle_deg(aff) < NO_SHEAR_DEG:
        return data, affine
    axis, shift, normal_step = _tilt(aff, where)

    nz = arr.shape[-3]
    grow = max(0, math.ceil(abs(shift) * (nz - 1) - SNAP))
    start = -grow if shift < 0 else 0  # first output index, in slice 0's index frame
    # Output index r of slice k lies where input index r + start - k * shift of that slice does.
    out_len = arr.shape[-1 - axis] + grow
    pos = (np.arange(out_len, dtype=np.float64)[None, :] + start) - np.arange(nz)[:, None] * shift
    near = np.rint(pos)
    pos = np.where(np.abs(pos - near) < SNAP, near, pos)

    fill_value = float(arr.min()) if fill is None else float(fill)
    vols = arr if arr.ndim == 4 else arr[None]
    out = np.stack([_shift_slices(v, pos, axis, order, fill_value) for v in vols])
    out = out if arr.ndim == 4 else out[0]

    new_affine = aff.copy()
    new_affine[:3, 2] = normal_step
    new_affine[:3, 3] = aff[:3, 3] + start * aff[:3, axis]
    return _as_dtype(out, arr.dtype), new_affine


def _tilt(aff: np.ndarray, where: str) -> tuple[int, float, np.ndarray]:
    """The in-plane index axis the shear runs along (0: columns ``i``, 1: rows ``j``), the
    shift per slice along it in voxels, and the perpendicular slice step (world mm)."""
    a_i, a_j, a_k = aff[:3, 0], aff[:3, 1], aff[:3, 2]
    len_i, len_j = float(np.linalg.norm(a_i)), float(np.linalg.norm(a_j))
    if len_i == 0.0 or len_j == 0.0:
        raise UnsupportedDataError(where, "affine has a zero-length in-plane axis; cannot resample its gantry tilt")
    cos_ij = abs(float(a_i @ a_j)) / (len_i * len_j)
    if cos_ij > IN_PLANE_COS_TOL:
        raise UnsupportedDataError(
            where, f"in-plane axes are {math.degrees(math.acos(min(1.0, cos_ij))):.3f} degrees apart, not 90: "
                   "an in-plane shear, not a gantry tilt; cannot resample onto an orthogonal grid")
    normal = np.cross(a_i, a_j)
    normal /= np.linalg.norm(normal)
    # The slice step in the basis (column axis, row axis, unit normal): shifts in voxels, then mm.
    u, v, w = np.linalg.solve(np.column_stack([a_i, a_j, normal]), a_k)
    if abs(w) < 1e-9 * float(np.linalg.norm(a_k)):
        raise UnsupportedDataError(where, "slice step lies in the image plane; not a stack of slices")
    lean_i = math.degrees(math.atan2(abs(u) * len_i, abs(w)))
    lean_j = math.degrees(math.atan2(abs(v) * len_j, abs(w)))
    if min(lean_i, lean_j) >= NO_SHEAR_DEG:
        raise UnsupportedDataError(
            where, f"shear along both in-plane axes ({lean_i:.2f} degrees along the columns, {lean_j:.2f} along "
                   "the rows): not a gantry tilt, which shears along one axis; cannot resample onto an orthogonal grid")
    axis = 0 if lean_i > lean_j else 1
    return axis, float(u if axis == 0 else v), w * normal


def _shift_slices(vol: np.ndarray, pos: np.ndarray, axis: int, order: int, fill: float) -> np.ndarray:
    """Resample each slice of one ``(z, y, x)`` volume along ``axis`` (0: x, 1: y) at the input
    indices ``pos[k]`` (one row per slice), in float64."""
    work = vol if axis == 1 else vol.swapaxes(1, 2)  # the shifted axis second
    n = work.shape[1]
    k = np.arange(work.shape[0])[:, None]
    if order == 0:
        idx = np.floor(pos + 0.5)
        valid = (idx >= 0) & (idx <= n - 1)
        res = work[k, np.clip(idx, 0, n - 1).astype(np.intp)].astype(np.float64)
    else:
        # Linear only between two samples of the slice: a position past its last sample is
        # fill, not the edge repeated (dcm2niix repeats one edge for up to a voxel, see tests).
        valid = (pos >= 0) & (pos <= n - 1)
        lo = np.clip(np.floor(pos), 0, n - 1).astype(np.intp)
        hi = np.minimum(lo + 1, n - 1)
        frac = np.where(valid, pos - lo, 0.0)[..., None]
        res = work[k, lo].astype(np.float64) * (1.0 - frac) + work[k, hi].astype(np.float64) * frac
    res = np.where(valid[..., None], res, fill)
    return res if axis == 1 else res.swapaxes(1, 2)


def _as_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iub":
        rounded = np.sign(values) * np.floor(np.abs(values) + 0.5)
        if dtype.kind != "b":
            info = np.iinfo(dtype)
            rounded = np.clip(rounded, info.min, info.max)
        return rounded.astype(dtype)
    return values.astype(dtype, copy=False)
