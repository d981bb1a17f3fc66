"""A planned stack made a volume: its voxels (:func:`~voxelflow.io.dicom.pixels.load_stack`),
its geometry (exact, or a gantry tilt resampled onto an orthogonal grid on request) and what
the volume records beyond its first image's technical attributes: the diffusion encoding,
how vendor scaling was applied, the tilt, and the BIDS sidecar of its export."""

from __future__ import annotations

from typing import Any

import numpy as np

from voxelflow.geometry import shear_angle_deg
from voxelflow.io.dicom.assembly import StackPlan
from voxelflow.io.dicom.diffusion import plan_diffusion
from voxelflow.io.dicom.pixels import load_stack
from voxelflow.io.dicom.sidecar import stack_sidecar
from voxelflow.io.dicom.tilt import resample_orthogonal

TILT_MIN_DEG = 0.01  # shear below this is rounding in the positions, not a gantry tilt


def stack_volume(plan: StackPlan, resample_tilt: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(voxels, affine, attributes)`` of one planned stack.

    Args:
        plan: the stack.
        resample_tilt: resample a gantry-tilted stack onto an orthogonal grid (as dcm2niix's
            ``_Tilt``) instead of keeping its exact sheared geometry.

    Raises:
        InvalidInputError: its pixels cannot be read, or its tilt cannot be resampled.
        OSError: a file cannot be read now (transient).
    """
    data = load_stack(plan)
    attributes = stack_attributes(plan)
    affine = plan.affine
    tilt = shear_angle_deg(affine)
    if tilt > TILT_MIN_DEG:
        if resample_tilt:
            data, affine = resample_orthogonal(data, affine, where=f"series {plan.series} [{plan.label}]")
            attributes["tilt"] = (f"resampled: a gantry tilt of {tilt:.2f} degrees resampled onto an orthogonal "
                                  "grid (linear, as dcm2niix's _Tilt)")
        else:
            attributes["tilt"] = (f"sheared: a gantry tilt of {tilt:.2f} degrees kept as exact sheared geometry "
                                  "(every slice at its ImagePositionPatient)")
    try:
        attributes["sidecar"] = stack_sidecar(plan.files, plan.timepoints)
    except OSError:
        raise  # transient: the task retries
    except Exception as exc:  # noqa: BLE001 - a malformed private block costs the sidecar, not the volume
        plan.warnings.append(f"no BIDS sidecar: {type(exc).__name__}: {exc}")
    return data, affine, attributes


def stack_attributes(plan: StackPlan) -> dict[str, Any]:
    """The diffusion encoding (b-value and patient-frame direction per time point) and how
    the values were scaled where a vendor's rule applied."""
    out: dict[str, Any] = {}
    diffusion = plan_diffusion(plan.files, plan.timepoints)
    if diffusion is not None:
        out["diffusion"] = diffusion
    if any(r.get("scale_slope") and r.get("manufacturer") == "Philips" for r in plan.files):
        out["scaling"] = "Philips precise (floating point): stored value / MRScaleSlope (2005,100E), as dcm2niix -p y"
    return out
