"""Gantry tilt: the sheared stack resampled onto an orthogonal grid equals dcm2niix's ``_Tilt``
output in world space, keeps every value where it was in the world, and only a single-axis
shear is resampled."""

from __future__ import annotations

import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import canonical
from voxelflow.errors import UnsupportedDataError
from voxelflow.geometry import dicom_affine, shear_angle_deg, slice_normal
from voxelflow.io.dicom.tilt import resample_orthogonal
from voxelflow.phantom import SeriesSpec, ct_phantom, oblique_orientation, write_ct_series

TILT_DEG = 15.0
SHAPE = (12, 64, 64)  # slices, rows, cols
SPEC = SeriesSpec()  # axial, 0.8 mm pixels, 2.5 mm between slice planes


def _tilted_series(folder, direction: int):
    """A CT series whose slices move along LPS y by 2.5 * tan(15 deg) mm each (``direction``
    +1 or -1), as a gantry tilt moves them; returns the (z, y, x) HU and the exact sheared
    affine built from the positions as written."""
    paths = write_ct_series(ct_phantom(SHAPE), folder, SPEC)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        shift = direction * k * SPEC.slice_spacing * np.tan(np.radians(TILT_DEG))
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y + shift:.4f}", f"{z:.4f}"]
        # dcm2niix corrects tilt only for int16 (or float32) images, and this version keeps
        # unsigned 16-bit data unsigned, so the stored values are made signed (as GE writes).
        ds.PixelRepresentation = 1
        ds.PixelData = ds.pixel_array.astype(np.int16).tobytes()
        ds.save_as(p)
    dss = [pydicom.dcmread(p) for p in paths]
    orientation = [float(v) for v in dss[0].ImageOrientationPatient]
    normal = slice_normal(orientation)
    dss.sort(key=lambda d: np.asarray(d.ImagePositionPatient, float) @ normal)
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    affine = dicom_affine(orientation, pos[0], [float(v) for v in dss[0].PixelSpacing],
                          (pos[-1] - pos[0]) / (len(pos) - 1))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    return hu.astype(np.int16), affine


def _dcm2niix_tilt(folder, outdir):
    import dcm2niix as d2n

    outdir.mkdir()
    proc = subprocess.run([d2n.bin, "-z", "n", "-b", "n", "-f", "%s_%p", "-o", str(outdir), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # dcm2niix writes the slices unresampled (with an unsheared affine, so every slice but the
    # first is misplaced by the shear) and the resampled copy with "_Tilt" in its name.
    files = sorted(outdir.glob("*.nii"))
    tilt = [f for f in files if "_Tilt" in f.name]
    assert len(files) == 2 and len(tilt) == 1, [f.name for f in files]
    return tilt[0]


def _sample_sheared(data, affine, world, axis, tol=1e-6):
    """Linear interpolation of a sheared ``(z, y, x)`` stack at world points ``(n, 3)``, along
    the in-plane index axis ``axis`` (0: column, 1: row) only: the points must lie on slices and
    on the other in-plane axis' voxel centres (within ``tol`` voxels). NaN where a point falls
    outside its slice."""
    idx = np.linalg.solve(affine, np.c_[world, np.ones(len(world))].T)[:3]
    other = 1 - axis
    np.testing.assert_allclose(idx[2], np.rint(idx[2]), atol=tol)  # a resampled voxel stays on its slice
    np.testing.assert_allclose(idx[other], np.rint(idx[other]), atol=tol)
    k, o, t = np.rint(idx[2]).astype(int), np.rint(idx[other]).astype(int), idx[axis]
    n = data.shape[2 - axis]
    inside = (t >= -1e-6) & (t <= n - 1 + 1e-6)
    lo = np.clip(np.floor(t + 1e-6), 0, n - 1).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = np.clip(t - lo, 0.0, 1.0)

    def at(i):
        return data[k, i, o] if axis == 1 else data[k, o, i]

    return np.where(inside, at(lo) * (1 - frac) + at(hi) * frac, np.nan)


def _centres(shape_xyz, affine):
    ijk = np.stack(np.meshgrid(*map(np.arange, shape_xyz), indexing="ij"), -1).reshape(-1, 3)
    return (affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T


@pytest.mark.parametrize("direction", [-1, +1], ids=["slices-move-anterior", "slices-move-posterior"])
def test_resample_matches_dcm2niix_tilt_output(tmp_path, direction):
    """Same grid and affine as dcm2niix's ``_Tilt`` file; same voxels where our answer is exact.

    Voxel tolerance: 1 HU. Both interpolate linearly along the rows and round, but dcm2niix
    weighs in float32 and rounds the stored value (HU + 1024), so a weight a hair from .5 can
    round the other way: measured, 11 of 48448 compared voxels differ by 1 HU, none by more.

    Known differences, both dcm2niix's (v1.0.20260724, ``nii_saveNII3Dtilt`` in
    ``console/nii_dicom_batch.cpp``):

    * Edges: a sample falling less than a row beyond a slice's last NIfTI row (DICOM row 0)
      gets that row's value; we give fill, as beyond the other edge. So only voxels our answer
      covers are compared, and ours is fill wherever dcm2niix's is, bar that one row per slice.
    * Slices moving to higher DICOM rows (dcm2niix: negative tilt): dcm2niix moves the origin
      by the whole number of rows it pads with, ``ceil(x)``, but shifts the pixels by ``x``
      (``x`` = the shear's offset of the last slice in rows), so each voxel's value is the one
      ``ceil(x) - x`` rows (0.79 rows, 0.63 mm here) towards DICOM row 0 from where its affine
      puts it. Its values are the exact ones at the points moved back by that much.
    """
    hu, affine = _tilted_series(tmp_path / "dcm", direction)
    assert shear_angle_deg(affine) == pytest.approx(TILT_DEG, abs=0.01)
    ref_data, ref_affine = canonical(_dcm2niix_tilt(tmp_path / "dcm", tmp_path / "ref"))

    out, out_affine = resample_orthogonal(hu, affine)
    assert out.dtype == np.int16
    assert shear_angle_deg(out_affine) < 1e-6
    mine, mine_affine = canonical(nib.Nifti1Image(out.transpose(2, 1, 0), out_affine))
    covered = ~np.isnan(canonical(nib.Nifti1Image(
        resample_orthogonal(hu.astype(np.float64), affine, fill=np.nan)[0].transpose(2, 1, 0), out_affine))[0])

    assert mine.shape == ref_data.shape == (64, 64 + 10, 12)  # 11 * 0.837 rows of shear -> 10 more rows
    np.testing.assert_allclose(mine_affine, ref_affine, atol=1e-3)
    assert np.all(mine[~covered] == hu.min())  # fill: the darkest value, as dcm2niix's
    edge = (ref_data[~covered] != hu.min()).sum()
    assert edge <= SHAPE[0] * SHAPE[2]  # at most one repeated row per slice

    if direction < 0:
        diff = np.abs(mine - ref_data)[covered]
        assert diff.max() <= 1.0, diff.max()
        assert (diff == 0).mean() > 0.99
        return
    # dcm2niix's voxels are misplaced along the rows by ceil(x) - x: ours differ from them by
    # hundreds of HU at the body's edges; the exact values at the points moved back match them.
    assert np.abs(mine - ref_data)[covered].max() > 100
    shear_rows = (SHAPE[0] - 1) * SPEC.slice_spacing * np.tan(np.radians(TILT_DEG)) / SPEC.pixel_spacing[0]
    misplaced = np.ceil(shear_rows) - shear_rows
    world = _centres(ref_data.shape, ref_affine) - misplaced * affine[:3, 1]
    # dcm2niix's affine is float32: its voxel centres are exact to ~1e-5 voxels only.
    exact = _sample_sheared(hu.astype(np.float64), affine, world, axis=1, tol=1e-3).reshape(ref_data.shape)
    ok = ~np.isnan(exact)
    assert ok.mean() > 0.8
    assert np.abs(exact - ref_data)[ok].max() <= 1.0


def test_a_stack_without_shear_comes_back_unchanged():
    data = ct_phantom((4, 16, 16))
    affine = dicom_affine(oblique_orientation(20, 30), (-100, -90, 20), (0.7, 0.9), (0, 0, 2.5))
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    affine[:3, 2] = 2.5 * normal / np.linalg.norm(normal)
    out, out_affine = resample_orthogonal(data, affine)
    assert out is data and out_affine is affine
    # A hundredth of a degree is rounding in the positions, not a tilt.
    affine[:3, 2] += 2.5 * np.tan(np.radians(0.005)) * affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    assert 0.004 < shear_angle_deg(affine) < 0.01
    out, out_affine = resample_orthogonal(data, affine)
    assert out is data and out_affine is affine


def test_a_shear_along_both_in_plane_axes_is_refused():
    affine = dicom_affine((1, 0, 0, 0, 1, 0), (-150, -150, 0), (0.8, 0.8), (0.5, 0.67, 2.5))
    with pytest.raises(UnsupportedDataError, match="shear along both in-plane axes") as err:
        resample_orthogonal(np.zeros((4, 8, 8), np.int16), affine, where="series 1.2.3")
    assert err.value.where == "series 1.2.3"
    assert isinstance(err.value, ValueError)  # bad input for the pipeline, never retried
    skewed = dicom_affine((1, 0, 0, 0.1, 0.995, 0), (-150, -150, 0), (0.8, 0.8), (0, 0.67, 2.5))
    with pytest.raises(UnsupportedDataError, match="in-plane shear"):
        resample_orthogonal(np.zeros((4, 8, 8), np.int16), skewed)


@pytest.mark.parametrize("axis,orientation,tilt_deg", [
    (1, (1, 0, 0, 0, 1, 0), 20.0),  # the gantry tilt: slices move along the columns' direction
    (1, oblique_orientation(25, 10), -12.0),
    (0, oblique_orientation(-30, 5), 8.0),  # slices moving along the rows' direction
])
def test_the_resampled_grid_keeps_every_value_where_it_is_in_the_world(axis, orientation, tilt_deg):
    """Each output voxel centre, mapped through the sheared affine, lands on a slice of the
    input; its value is the input interpolated there, and a ramp in world z, which linear
    interpolation reproduces exactly, is kept at every covered voxel. 4-D data is resampled
    per time point."""
    spacing, step = (0.7, 0.9), 2.0
    affine = dicom_affine(orientation, (-60, -50, 10), spacing, (0, 0, 0))
    a_in = affine[:3, axis] / np.linalg.norm(affine[:3, axis])
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal /= np.linalg.norm(normal)
    affine[:3, 2] = step * normal + step * np.tan(np.radians(tilt_deg)) * a_in
    assert shear_angle_deg(affine) == pytest.approx(abs(tilt_deg), abs=1e-6)
    nz, ny, nx = 7, 20, 24
    ramp = _centres((nx, ny, nz), affine)[:, 2].reshape(nx, ny, nz).transpose(2, 1, 0)
    rng = np.random.default_rng(1)
    noise = rng.normal(size=ramp.shape)
    data = np.stack([ramp, noise])  # (t, z, y, x)

    out, out_affine = resample_orthogonal(data, affine, fill=np.nan)
    cols = out_affine[:3, :3]
    assert abs(cols[:, 0] @ cols[:, 2]) < 1e-9 and abs(cols[:, 1] @ cols[:, 2]) < 1e-9
    np.testing.assert_allclose(out_affine[:3, 2], step * normal, atol=1e-9)
    shape_xyz = out.shape[1:][::-1]
    grow = int(np.ceil((nz - 1) * step * abs(np.tan(np.radians(tilt_deg))) / spacing[1 - axis]))
    assert shape_xyz[axis] == (nx, ny)[axis] + grow and shape_xyz[2] == nz

    world = _centres(shape_xyz, out_affine)
    covered = ~np.isnan(out[0].transpose(2, 1, 0).ravel())
    assert covered.mean() > 0.6
    np.testing.assert_allclose(out[0].transpose(2, 1, 0).ravel()[covered], world[covered, 2], atol=1e-9)
    for t in range(2):
        expected = _sample_sheared(data[t], affine, world, axis)
        np.testing.assert_array_equal(np.isnan(expected), ~covered)
        np.testing.assert_allclose(out[t].transpose(2, 1, 0).ravel()[covered], expected[covered], atol=1e-9)

    # Integer data comes back in its dtype, rounded, the same values.
    as_int = np.rint(noise * 1000).astype(np.int32)
    out_int, _ = resample_orthogonal(as_int, affine)
    ref = resample_orthogonal(as_int.astype(np.float64), affine)[0]
    assert out_int.dtype == np.int32
    assert np.abs(out_int - ref).max() <= 0.5
    assert np.all(out_int.transpose(2, 1, 0).ravel()[~covered] == as_int.min())
