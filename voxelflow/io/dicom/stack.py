"""A planned stack made a volume: its voxels (:func:`~voxelflow.io.dicom.pixels.load_stack`),
its geometry (exact, or a gantry tilt resampled onto an orthogonal grid on request) and what
the volume records beyond its first image's technical attributes: the diffusion encoding,
how vendor scaling was applied, the tilt, and the BIDS sidecar of its export."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom

from voxelflow.geometry import shear_angle_deg
from voxelflow.io.dicom.assembly import StackPlan
from voxelflow.io.dicom.diffusion import plan_diffusion
from voxelflow.io.dicom.pixels import load_stack
from voxelflow.io.dicom.coerce import normalise
from voxelflow.io.dicom.sidecar import SIDECAR_KEYWORDS, bids_sidecar, functional_group_attributes
from voxelflow.io.dicom.timing import (
    complex_component_ge,
    phase_polarity_from_csa,
    phase_polarity_from_frames,
    phase_polarity_ge,
    repetition_time_ge,
    slice_times_from_csa,
    slice_times_from_frames,
    slice_times_ge,
)
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


def stack_sidecar(files: Sequence[Mapping[str, Any]], timepoints: int = 1) -> dict[str, Any]:
    """The sidecar of one planned stack (its scan records in slice order, time-major), read
    from its files while ingest still has them (``local``): the allow-listed attributes of
    its first image, the functional groups of its frame in an enhanced file, and the vendor's
    slice times and phase-encoding polarity (one helper per source, as above).

    Raises:
        OSError: a file cannot be read (ingest treats it as transient).
    """
    first = files[0]
    ds = _header(first["local"])
    attributes = {k: normalise(ds.get(k)) for k in SIDECAR_KEYWORDS if ds.get(k) not in (None, "")}
    extra: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    enhanced = "PerFrameFunctionalGroupsSequence" in ds and not first.get("mosaic")
    if enhanced:
        extra.update(functional_group_attributes(ds, int(first.get("frame") or 0)))
    per = len(files) // max(timepoints, 1)
    # one file per volume of the first two time points (a mosaic or an enhanced file each)
    volumes = [files[k * per]["local"] for k in range(min(timepoints, 2))]
    maker = first.get("manufacturer") or ""
    if maker == "Siemens":
        if first.get("mosaic"):
            kwargs["slice_times"] = slice_times_from_csa([ds] + [_header(p) for p in volumes[1:]
                                                                  if p != first["local"]])
            kwargs["phase_polarity"] = phase_polarity_from_csa(ds)
            extra.update(Rows=float(first["rows"]), Columns=float(first["cols"]))  # the tiles
        elif enhanced:
            others = [_header(p) for p in volumes[1:] if p != first["local"]]
            kwargs["slice_times"] = slice_times_from_frames([ds] + others)
            kwargs["phase_polarity"] = phase_polarity_from_frames(ds)
        else:
            kwargs["phase_polarity"] = phase_polarity_from_csa(ds)
    elif maker == "GE":
        if timepoints > 1:  # dcm2niix times GE slices of 4-D series only
            # slice_times_ge reads the protocol block of the first image in instance order; the
            # others need only their instance number and position, which the scan has
            volume = files[:per]
            lead = min(range(len(volume)), key=lambda i: volume[i].get("instance_number") or 0)
            kwargs["slice_times"] = slice_times_ge([_header(r["local"]) if i == lead else _Slice(r)
                                                    for i, r in enumerate(volume)])
        kwargs["phase_polarity"] = phase_polarity_ge(ds)
        extra["RepetitionTime"] = repetition_time_ge(ds)
        extra["ComplexImageComponent"] = complex_component_ge(ds)
    return bids_sidecar(attributes, extra={k: v for k, v in extra.items() if v is not None}, **kwargs)


class _Slice:
    """One image of a volume as :func:`slice_times_ge` reads it, from its scan record."""

    def __init__(self, rec: Mapping[str, Any]):
        self.InstanceNumber = rec.get("instance_number")
        self.ImagePositionPatient = rec["position"]

    def get(self, keyword: str, default: Any = None) -> Any:
        return getattr(self, keyword, default)


def _header(path: str) -> pydicom.Dataset:
    """A file's header, parsed once for all the volumes it holds (the kinds of an enhanced
    file: parsing its per-frame groups is most of a sidecar's cost). Keyed by size and time
    of change too, so a file changed between two runs in one process is parsed again."""
    st = os.stat(path)
    return _parsed(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parsed(path: str, size: int, mtime_ns: int) -> pydicom.Dataset:
    return pydicom.dcmread(path, force=True, stop_before_pixels=True)
