"""Series assembly: the records of one series become stacks (:class:`StackPlan`), each one
orientation and matrix with one image per slice position, slices sorted along the normal and
evenly spaced. How several images at one position are told apart (echoes, image types,
repeats over time) is :func:`_split_repeats`; 4-D series are :func:`_as_time_series`.
Anything inconsistent raises :class:`~voxelflow.errors.SeriesAssemblyError` with the reason."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voxelflow.errors import InvalidInputError, NotAnImageError, SeriesAssemblyError
from voxelflow.geometry import dicom_affine, slice_normal
from voxelflow.io.dicom.frames import expand_frames
from voxelflow.io.dicom.repeats import POSITION_TOL_MM, Repeats, split_kinds, split_repeats

# characters, so exact equality cannot be expected; anything beyond these is real.
ORIENTATION_TOL = 1e-4  # direction cosine components
SPACING_REL_TOL = 0.005  # relative deviation of one gap from the mean gap


@dataclass
class StackPlan:
    """One volume to build: files in slice order and the geometry they share."""

    series: str
    label: str  # what distinguishes this stack inside its series ("" when it is the only one)
    files: list[dict[str, Any]]  # records with "source", "path", "local", sorted along the normal
    shape: tuple[int, int, int]  # (slices, rows, cols)
    affine: np.ndarray  # RAS, index (col, row, slice)
    warnings: list[str] = field(default_factory=list)
    timepoints: int = 1  # > 1: a 4-D series, ``files`` time-major (every slice of t=0, then t=1, ...)
    time_step: float | None = None  # seconds between time points (4-D)
    # Irregularly spaced slices: each file's distance (mm) from the first along the stack;
    # load_stack interpolates them onto ``shape[0]`` evenly spaced slices.
    offsets: list[float] | None = None
    channels: str | None = None  # "RGB": colour images, loaded as ``(3, slices, rows, cols)``


def _geometry_key(rec: dict[str, Any]) -> tuple:
    orient = tuple(round(v / ORIENTATION_TOL) for v in rec["orientation"])
    spacing = tuple(round(v, 4) for v in rec["pixel_spacing"])
    return (orient, rec["rows"], rec["cols"], spacing)


def _describe_key(key: tuple, n_keys: int) -> str:
    orient, rows, cols, spacing = key
    return f"{rows}x{cols} @ {spacing[0]:g}x{spacing[1]:g} mm, orientation " + \
        ",".join(f"{v * ORIENTATION_TOL:.3f}" for v in orient) if n_keys > 1 else ""


MAX_RESAMPLE_GAP = 2.0  # wider gaps (relative to the median) are not bridged by interpolation


def _resampled_stack(series: str, label: str, recs: list[dict[str, Any]], pos: np.ndarray, normal: np.ndarray,
                     median: float, uneven: str) -> StackPlan:
    """A plan that interpolates unevenly spaced (collinear) slices onto an even grid: from the
    first slice to the last, with the spacing closest to the median gap that divides the
    extent. Linear interpolation between the two neighbouring slices; the warning says so."""
    first = recs[0]
    extent_vec = pos[-1] - pos[0]
    extent = float(np.linalg.norm(extent_vec))
    direction = extent_vec / extent
    rel = pos - pos[0]
    off = np.linalg.norm(rel - np.outer(rel @ direction, direction), axis=1).max()
    if off > max(POSITION_TOL_MM, SPACING_REL_TOL * median):
        raise SeriesAssemblyError(f"series {series}" + (f" [{label}]" if label else ""),
                                  f"slice positions are not collinear: a slice lies {off:.3g} mm off the line "
                                  "through the first and last slice")
    slices = int(round(extent / median)) + 1
    spacing = extent / (slices - 1)
    affine = dicom_affine(first["orientation"], pos[0], first["pixel_spacing"], direction * spacing)
    warning = (f"{uneven}; resampled onto {slices} evenly spaced slices of {spacing:.4g} mm by linear "
               f"interpolation between neighbouring slices (values rounded to the stored type where it is "
               f"an integer type)")
    tilt = np.degrees(np.arccos(min(1.0, abs(float(np.dot(direction, normal))))))
    warnings = [warning] + ([f"gantry tilt / shear of {tilt:.2f} degrees: stored with its true sheared geometry"]
                            if tilt > 0.01 else [])
    return StackPlan(series=series, label=label, files=recs, shape=(slices, first["rows"], first["cols"]),
                     affine=affine, warnings=warnings, offsets=[float(v) for v in rel @ direction])


def resample_slices(data: np.ndarray, offsets: list[float], slices: int) -> np.ndarray:
    """``data`` ``(n, y, x)`` with slice ``k`` at ``offsets[k]`` (increasing, mm), interpolated
    linearly onto ``slices`` evenly spaced slices from the first offset to the last. Integer
    input is rounded back to its type."""
    d = np.asarray(offsets, dtype=np.float64)
    targets = np.linspace(d[0], d[-1], slices)
    hi = np.clip(np.searchsorted(d, targets, side="right"), 1, len(d) - 1)
    lo = hi - 1
    w = ((targets - d[lo]) / (d[hi] - d[lo])).astype(np.float32)
    out = np.empty((slices, *data.shape[1:]), dtype=data.dtype)
    for k in range(slices):
        value = data[lo[k]].astype(np.float32) * (1 - w[k]) + data[hi[k]].astype(np.float32) * w[k]
        out[k] = np.rint(value) if data.dtype.kind in "iu" else value
    return out


def _build_stack(series: str, label: str, recs: list[dict[str, Any]], normal: np.ndarray) -> StackPlan:
    first = recs[0]
    if len({(r["bits_allocated"], r["pixel_representation"], r["samples"]) for r in recs}) > 1:
        raise SeriesAssemblyError(f"series {series}", "images differ in BitsAllocated / PixelRepresentation / SamplesPerPixel")
    warnings: list[str] = []
    recs = sorted(recs, key=lambda r: float(np.dot(normal, r["position"])))
    pos = np.array([r["position"] for r in recs], dtype=np.float64)
    n = len(recs)
    if n == 1:
        thickness = first.get("spacing_between_slices") or first.get("slice_thickness")
        if not thickness:
            thickness = 1.0
            warnings.append("single slice without SliceThickness: slice spacing set to 1 mm")
        step = normal * float(thickness)
    else:
        gaps = np.diff(pos @ normal)
        mean_gap = float(gaps.mean())
        dev = np.abs(gaps - mean_gap)
        tol = max(POSITION_TOL_MM, SPACING_REL_TOL * mean_gap)
        if dev.max() > tol:
            bad = int(np.argmax(dev))
            uneven = (f"slices are not evenly spaced: gap {gaps[bad]:.4g} mm between slices {bad} and {bad + 1} "
                      f"differs from the mean gap {mean_gap:.4g} mm (tolerance {tol:.3g} mm); "
                      f"gaps seen: {sorted({round(float(g), 3) for g in gaps})[:6]}")
            median = float(np.median(gaps))
            if gaps.min() <= POSITION_TOL_MM or gaps.max() > MAX_RESAMPLE_GAP * median:
                raise SeriesAssemblyError(f"series {series}" + (f" [{label}]" if label else ""),
                                          uneven + f"; not resampled (a gap wider than {MAX_RESAMPLE_GAP:g}x "
                                                   f"the median {median:.4g} mm, or slices at one position)")
            return _resampled_stack(series, label, recs, pos, normal, median, uneven)
        step = (pos[-1] - pos[0]) / (n - 1)
        # Every position must lie on the line from the first to the last slice.
        line = pos[0] + np.outer(np.arange(n), step)
        off = np.linalg.norm(pos - line, axis=1).max()
        if off > max(POSITION_TOL_MM, SPACING_REL_TOL * float(np.linalg.norm(step))):
            raise SeriesAssemblyError(
                f"series {series}" + (f" [{label}]" if label else ""),
                f"slice positions are not collinear: a slice lies {off:.3g} mm off the line "
                "through the first and last slice")
        thickness = first.get("slice_thickness")
        if thickness and abs(thickness - abs(mean_gap)) > 0.01 + 0.01 * thickness:
            warnings.append(f"slice spacing {abs(mean_gap):.4g} mm (from positions) differs from "
                            f"SliceThickness {thickness:.4g} mm; positions used")
        tilt = np.degrees(np.arccos(min(1.0, abs(float(np.dot(step, normal))) / np.linalg.norm(step))))
        if tilt > 0.01:
            warnings.append(f"gantry tilt / shear of {tilt:.2f} degrees: stored with its true sheared geometry")
    affine = dicom_affine(first["orientation"], pos[0], first["pixel_spacing"], step)
    return StackPlan(series=series, label=label, files=recs,
                     shape=(n, first["rows"], first["cols"]), affine=affine, warnings=warnings)


def not_part_of_a_volume(rec: dict[str, Any], keep_localizers: bool = False) -> str:
    """Why an image is not a slice of a volume ("" when it may be): localizer / scout images
    (ImageType LOCALIZER; kept as 2-D images with ``keep_localizers``) and secondary captures
    without patient geometry (screenshots, derived reports)."""
    tokens = {t.strip().upper() for t in (rec.get("image_type") or "").split("\\")}
    if "LOCALIZER" in tokens and not keep_localizers:
        return (f"localizer / scout image (ImageType {rec['image_type']}): not part of a volume "
                "(ingest with keep_localizers to store it as a 2-D image)")
    if "secondary capture" in (rec.get("sop_class") or "").lower() and \
            (not rec.get("orientation") or not rec.get("position")):
        return (f"secondary capture without patient geometry ({rec['sop_class']}, ImageType "
                f"{rec.get('image_type') or 'none'}): not part of a volume")
    return ""



def plan_series(series: str, records: list[dict[str, Any]],
                left_out: list[tuple[dict[str, Any], InvalidInputError]] | None = None) -> list[StackPlan]:
    """Split one series' records into consistent stacks.

    Args:
        series: the series' pseudonym (for messages).
        records: its scan records.
        left_out: where to put ``(record, error)`` for images that are not part of any stack
            while the others are: a stray slice far from its stack (:class:`NotAnImageError`:
            skipped), the images of one kind (an echo, the phase images, ...) that cannot be
            stacked (:class:`SeriesAssemblyError`: failed). ``None``: raise instead.

    Raises:
        SeriesAssemblyError: the images cannot be stacked consistently (the reason says why).
        UnsupportedDataError: multi-frame images without per-frame geometry.
        NotAnImageError: color images (screen captures, photos): not a volume.
    """
    colour = any(r["samples"] != 1 for r in records)
    if colour and not all(_colour_map(r) for r in records):
        raise NotAnImageError(
            f"series {series}", f"color images (SamplesPerPixel={records[0]['samples']}, "
                                f"{records[0]['photometric']}) without patient geometry are not a volume")
    records = expand_frames(series, records)
    missing = [r["path"] for r in records if not r["orientation"] or not r["position"] or not r["pixel_spacing"]]
    if missing:
        raise SeriesAssemblyError(
            f"series {series}",
            f"{len(missing)} image(s) lack ImageOrientationPatient/ImagePositionPatient/PixelSpacing "
            f"(e.g. {missing[0]}); geometry cannot be derived")
    for r in records:
        row, col = np.asarray(r["orientation"][:3]), np.asarray(r["orientation"][3:])
        if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 \
                or abs(float(row @ col)) > 1e-3:
            raise SeriesAssemblyError(
                r["path"], f"ImageOrientationPatient {r['orientation']} is not two orthogonal unit "
                           f"vectors (|row|={np.linalg.norm(row):.4f}, |col|={np.linalg.norm(col):.4f}, "
                           f"row.col={float(row @ col):.4f})")
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        groups[_geometry_key(r)].append(r)
    plans: list[StackPlan] = []
    for key in sorted(groups, key=lambda k: (-len(groups[k]), str(k))):
        recs = groups[key]
        normal = slice_normal(recs[0]["orientation"])
        base = _describe_key(key, len(groups))
        kinds = split_kinds(recs)
        for kind, kind_recs in kinds:
            where = "; ".join(x for x in (base, kind) if x)
            try:
                plans.extend(_plan_kind(series, where, kind_recs, normal, left_out))
            except SeriesAssemblyError as exc:
                if left_out is None or len(kinds) == 1 and len(groups) == 1:
                    raise  # the whole series fails: the caller records the reason for all its files
                left_out.extend((r, exc) for r in kind_recs)
    if colour:
        for plan in plans:
            if plan.timepoints > 1 or plan.offsets is not None:
                raise SeriesAssemblyError(f"series {series}", "a colour (RGB) series over time or with uneven "
                                                              "slices: only 3-D colour maps are converted")
            plan.channels = "RGB"
    return plans


def _colour_map(rec: dict[str, Any]) -> bool:
    """An RGB image with patient geometry (a colour FA map, an Enhanced MR Color Image):
    stored as a 3-D volume with a channel axis. Screen captures and photos are not."""
    return (rec["samples"] == 3 and (rec.get("photometric") or "").upper() == "RGB"
            and rec.get("bits_allocated") == 8 and "secondary capture" not in (rec.get("sop_class") or "").lower()
            and (bool(rec.get("orientation") and rec.get("position")) or bool(rec.get("frame_info"))))


def _plan_kind(series: str, where: str, recs: list[dict[str, Any]], normal: np.ndarray,
               left_out: list[tuple[dict[str, Any], InvalidInputError]] | None) -> list[StackPlan]:
    """The stacks of one kind of image (see :mod:`voxelflow.io.dicom.repeats`)."""
    repeats = split_repeats(series, recs, normal, where)
    four_d = _as_time_series(series, where, repeats, normal) if repeats.time else None
    if four_d is not None:
        return [four_d]
    plans = []
    for label, sub in repeats.groups:
        full = "; ".join(x for x in (where, label) if x)
        parts, strays = _split_gaps(series, full, sub, normal)
        if strays and left_out is None:
            raise SeriesAssemblyError(strays[0][1].where, strays[0][1].reason)
        if strays:
            left_out.extend(strays)
        for part, run, note in parts:
            plan = _build_stack(series, "; ".join(x for x in (full, part) if x), run, normal)
            plan.warnings.extend([note] if note else [])
            plans.append(plan)
    return plans


def _as_time_series(series: str, base: str, repeats: Repeats, normal: np.ndarray) -> StackPlan | None:
    """One 4-D plan when the images at each slice position are repeats over time: the groups
    differ only by TemporalPositionIdentifier or AcquisitionNumber and cover the same slice
    positions. Time points are ordered by acquisition time where every image has one, else by
    that attribute; the time step is the median difference of the time points' acquisition
    times (else RepetitionTime for MR, else unknown)."""
    groups = repeats.groups
    if len(groups) < 2:
        return None
    stacks = [_build_stack(series, base, recs, normal) for _, recs in groups]
    if any(s.offsets is not None for s in stacks):
        return None  # resampled stacks stay separate volumes
    first = stacks[0]
    for s in stacks[1:]:
        if s.shape != first.shape or not np.allclose(s.affine, first.affine, atol=POSITION_TOL_MM):
            return None  # not the same slices: separate volumes
    attr = repeats.time

    def when(stack: StackPlan) -> float | None:
        times = [r.get("acquisition_time") for r in stack.files]
        return min(times) if all(t is not None for t in times) else None

    times = [when(s) for s in stacks]
    if attr == "repeat":  # already ranked at each position by the best key there was
        order = list(range(len(stacks)))
        how = repeats.how
    elif all(t is not None for t in times) and len(set(times)) == len(times):
        order = sorted(range(len(stacks)), key=lambda i: times[i])
        how = "acquisition time"
    else:
        order = sorted(range(len(stacks)), key=lambda i: (stacks[i].files[0].get(attr) is None,
                                                           stacks[i].files[0].get(attr)))
        how = attr
    stacks = [stacks[i] for i in order]
    step = None
    if all(times[i] is not None for i in order):
        diffs = np.diff([times[i] for i in order])
        step = float(np.median(diffs)) if len(diffs) and np.median(diffs) > 0 else None
    if step is None and first.files[0].get("repetition_time"):
        step = float(first.files[0]["repetition_time"]) / 1000.0
    warnings = sorted({w for s in stacks for w in s.warnings})
    warnings.append(f"4-D series: {len(stacks)} time points of {first.shape[0]} slices, ordered by {how}; "
                    f"time step {'%.4g s' % step if step else 'unknown'}")
    return StackPlan(series=series, label="; ".join(x for x in (base, "4-D") if x),
                     files=[r for s in stacks for r in s.files], shape=first.shape, affine=first.affine,
                     warnings=warnings, timepoints=len(stacks), time_step=step)


MAX_GAP_PARTS = 4  # more evenly spaced runs than this: irregular spacing, not missing slices
STRAY_GAPS = 10  # a lone slice this many slice gaps or more from its stack is a stray, not a gap


def _split_gaps(series: str, label: str, recs: list[dict[str, Any]], normal: np.ndarray
                ) -> tuple[list[tuple[str, list, str]], list[tuple[dict, NotAnImageError]]]:
    """Split a stack at missing slices into evenly spaced runs: ``([(part label, records,
    warning)], [(stray record, why)])``. A gap counts as missing slices when it is wider
    than the median gap; runs hold two or more slices, and a lone slice cut off by such gaps
    (a stray slice far from the stack, as in pydicom's ``77654033/CT2``) is left out with the
    reason. Anything else (unevenly spaced slices) is left to :func:`_build_stack`, which
    refuses it with the gaps it saw."""
    whole = ([("", recs, "")], [])
    if len(recs) < 3:
        return whole
    recs = sorted(recs, key=lambda r: float(np.dot(normal, r["position"])))
    d = np.array([float(np.dot(normal, r["position"])) for r in recs])
    gaps = np.diff(d)
    median = float(np.median(gaps))
    tol = max(POSITION_TOL_MM, SPACING_REL_TOL * median)
    breaks = np.flatnonzero(np.abs(gaps - median) > tol)
    if not len(breaks) or median <= 0 or (gaps[breaks] < median).any():
        return whole
    bounds = [0, *(int(b) + 1 for b in breaks), len(recs)]
    runs = [(a, recs[a:b]) for a, b in zip(bounds, bounds[1:])]
    # A lone slice is a stray only far from the rest; a lone slice after a gap of a few
    # missing slices is uneven spacing, which _build_stack refuses with the gaps it saw.
    strays = [(a, run[0]) for a, run in runs if len(run) == 1
              and min(abs(d[a] - d[j]) for j in range(len(d)) if j != a) > STRAY_GAPS * median]
    if len(strays) != sum(len(run) == 1 for _, run in runs):
        return whole
    runs = [(a, run) for a, run in runs if len(run) > 1]
    if not runs or len(runs) > MAX_GAP_PARTS or len(strays) > MAX_GAP_PARTS:
        return whole
    where = f"series {series}" + (f" [{label}]" if label else "")
    left_out = []
    for k, rec in strays:
        near = min(abs(d[k] - d[j]) for j in range(len(d)) if j != k)
        left_out.append((rec, NotAnImageError(where, f"stray slice {rec['path']} lies {near:.4g} mm from the nearest "
                                                     f"other slice of its stack, whose slices are {median:.4g} mm "
                                                     "apart: not part of the volume")))
    notes = []
    if len(runs) > 1:
        gaps_between = [b for b in breaks if not any(k in (b, b + 1) for k, _ in strays)]
        text = "; ".join(f"{gaps[b]:.4g} mm after slice {int(b)} (about {gaps[b] / median - 1:.3g} missing)"
                         for b in gaps_between)
        notes.append(f"missing slices: gaps of {text}, against {median:.4g} mm between the other slices; the stack "
                     f"is split into {len(runs)} evenly spaced volumes rather than given one spacing")
    if strays:
        notes.append(f"{len(strays)} stray slice(s) far from the stack left out (see the files' reasons)")
    note = "; ".join(notes)
    if len(runs) == 1:
        return [("", runs[0][1], note)], left_out
    return [(f"part {i + 1} of {len(runs)} (slices {a}-{a + len(run) - 1})", run, note)
            for i, (a, run) in enumerate(runs)], left_out

