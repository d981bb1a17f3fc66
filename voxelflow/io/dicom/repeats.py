"""How several images at one slice position are told apart: the one place that decides which
images of a series form which volume.

Two kinds of difference, applied in this order:

1. **Kinds** (:func:`split_kinds`) always make separate volumes: the echo, the complex part
   (magnitude, phase, real, imaginary, a field map in Hz), a derived isotropic (trace)
   diffusion image, original and derived images (ImageType), a classic and an enhanced
   export of the same series. They combine: a
   dual-echo field map holds four kinds, ``e1``, ``e1_ph``, ``e2``, ``e2_ph``, named as
   dcm2niix names its outputs.
2. **Repeats** (:func:`split_repeats`) inside one kind: each file of a series of Siemens
   mosaics, then the first attribute that makes every group a clean stack (ImageType,
   AcquisitionNumber, TemporalPositionIdentifier); the last three are repeats over time and
   become one 4-D volume where their stacks agree. Failing those (GE fMRI and DWI carry no
   TemporalPositionIdentifier and share one AcquisitionNumber; Philips DWI repeats the
   same TemporalPositionIdentifier), the images at each position are ordered by instance
   number, trigger time or acquisition time, as dcm2niix orders them, into time points; each
   time point must hold every slice, and the images of one time point must agree in
   b-value and direction.

Anything else raises :class:`~voxelflow.errors.SeriesAssemblyError` saying what was tried.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxelflow.errors import SeriesAssemblyError

POSITION_TOL_MM = 0.01  # positions are decimal strings: equal within this (see assembly)

# Repeats of one kind, in the order tried; the last three are repeats over time.
DISTINGUISHERS = ("image_type", "acquisition_number", "temporal_position")
TIME_ATTRIBUTES = ("temporal_position", "acquisition_number", "mosaic_volume", "repeat")
# What orders the images at one position into time points when no attribute says.
# The frames of one enhanced file share its InstanceNumber: their order in the file counts.
ORDER_KEYS = ("instance_number", "frame", "trigger_time", "acquisition_time")
_ORDER_NAMES = {"instance_number": "InstanceNumber", "frame": "frame order", "trigger_time": "TriggerTime",
                "acquisition_time": "AcquisitionTime"}

_COMPONENT_SUFFIX = {"magnitude": "", "": "", "phase": "ph", "real": "real", "imaginary": "imaginary",
                     "fieldmap_hz": "fieldmaphz"}


@dataclass
class Repeats:
    """The stacks of one kind: ``groups`` of ``(label, records)``; ``time`` names what tells
    the groups apart when they are time points of one 4-D volume (None: separate volumes)."""

    groups: list[tuple[str, list[dict[str, Any]]]]
    time: str | None = None
    how: str = ""  # how the time points were ordered, when no attribute said (for the warning)


def _position_key(rec: dict[str, Any], normal: np.ndarray) -> int:
    return round(float(np.dot(normal, rec["position"])) / POSITION_TOL_MM)


def positions_unique(recs: list[dict[str, Any]], normal: np.ndarray) -> bool:
    d = sorted(float(np.dot(normal, r["position"])) for r in recs)
    return all(b - a > POSITION_TOL_MM for a, b in zip(d, d[1:]))


def _enhanced(rec: dict[str, Any]) -> bool:
    return "enhanced" in (rec.get("sop_class") or "").lower()


def _derived(rec: dict[str, Any]) -> bool:
    """ImageType's first value: images derived from others (reformats, maps, re-encodings)
    never share a volume with the original images."""
    return (rec.get("image_type") or "").split("\\")[0].strip().upper() == "DERIVED"


def split_kinds(recs: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The records of one geometry split by echo x complex part x isotropic x export form;
    only attributes that vary name a kind (one kind: label "")."""
    forms = {_enhanced(r) for r in recs}
    # Echoes are numbered within an export form: classic files give EchoNumbers, enhanced
    # frames their effective echo time (voxelflow.io.dicom.frames).
    echoes = {form: sorted({r["echo_number"] for r in recs if _enhanced(r) == form and r.get("echo_number") is not None})
              for form in forms}
    comps = {r.get("component") or "" for r in recs}
    iso = {bool(r.get("isotropic")) for r in recs}
    derived = {_derived(r) for r in recs}
    groups: dict[tuple, list] = defaultdict(list)
    for r in recs:
        known = echoes[_enhanced(r)]
        echo = known.index(r["echo_number"]) + 1 if len(known) > 1 and r.get("echo_number") is not None else None
        groups[(_enhanced(r) if len(forms) > 1 else None, echo,
                (r.get("component") or "") if len(comps) > 1 else "",
                bool(r.get("isotropic")) if len(iso) > 1 else False,
                _derived(r) if len(derived) > 1 else False)].append(r)
    if len(groups) == 1:
        return [("", recs)]
    out = []
    for (enhanced, echo, comp, isotropic, is_derived), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        label = f"e{echo}" if echo else ""
        suffix = _COMPONENT_SUFFIX.get(comp, comp)
        label = "_".join(x for x in (label, suffix, "isotropic" if isotropic else "", "derived" if is_derived else "",
                                     {True: "enhanced", False: "classic", None: ""}[enhanced]) if x)
        out.append((label, group))
    return out


def split_repeats(series: str, recs: list[dict[str, Any]], normal: np.ndarray, where: str = "") -> Repeats:
    """The stacks of one kind (see the module docstring).

    Raises:
        SeriesAssemblyError: nothing separates the images at one position into stacks.
    """
    mosaics: dict[Any, list] = defaultdict(list)
    for r in recs:
        mosaics[r.get("mosaic_volume")].append(r)
    if len(mosaics) > 1 and None not in mosaics:  # each mosaic file is a volume of its own
        return Repeats([(f"mosaic_volume={k}", g) for k, g in sorted(mosaics.items())], "mosaic_volume")
    if positions_unique(recs, normal):
        return Repeats([("", recs)])
    for attr in DISTINGUISHERS:
        groups: dict[Any, list] = defaultdict(list)
        for r in recs:
            groups[r.get(attr)].append(r)
        if len(groups) > 1 and all(positions_unique(g, normal) for g in groups.values()):
            return Repeats([(f"{attr}={k}", g) for k, g in sorted(groups.items(), key=lambda kv: str(kv[0]))],
                           attr if attr in TIME_ATTRIBUTES else None)
    by_position: dict[int, list] = defaultdict(list)
    for r in recs:
        by_position[_position_key(r, normal)].append(r)
    counts = sorted({len(v) for v in by_position.values()})
    name = f"series {series}" + (f" [{where}]" if where else "")
    if len(counts) > 1:
        short = min(by_position, key=lambda k: len(by_position[k]))
        raise SeriesAssemblyError(
            name, f"{len(recs)} images over {len(by_position)} slice positions hold {counts[0]} to {counts[-1]} "
                  f"images each (the position at {short * POSITION_TOL_MM:.2f} mm along the normal has "
                  f"{len(by_position[short])}): no attribute ({', '.join(DISTINGUISHERS)}) separates them and "
                  f"as repeats over time some time points would miss slices")
    tried = []
    for key in ORDER_KEYS:
        if any(r.get(key) is None for r in recs):
            tried.append(f"{_ORDER_NAMES[key]} missing")
            continue
        if any(len({r[key] for r in v}) != len(v) for v in by_position.values()):
            tried.append(f"{_ORDER_NAMES[key]} repeats at one position")
            continue
        ranked = [sorted(v, key=lambda r: r[key]) for v in by_position.values()]
        points = [[dict(v[k], repeat=k + 1) for v in ranked] for k in range(counts[0])]
        clash = _diffusion_clash(points)
        if clash:
            tried.append(f"ordered by {_ORDER_NAMES[key]}, {clash}")
            continue
        return Repeats([(f"repeat={k + 1}", p) for k, p in enumerate(points)], "repeat",
                       f"{_ORDER_NAMES[key]} at each slice position (no attribute numbers the time points)")
    raise SeriesAssemblyError(
        name, f"{len(recs)} images over {len(by_position)} slice positions ({counts[0]} at each) and no attribute "
              f"({', '.join(DISTINGUISHERS)}) separates them into stacks; as repeats over time they cannot be "
              f"ordered: {'; '.join(tried)}")


def _diffusion_clash(points: list[list[dict[str, Any]]]) -> str:
    """Why these time points are not volumes of one diffusion encoding each ("" when they are)."""
    for k, point in enumerate(points):
        bs = [r["b_value"] for r in point if r.get("b_value") is not None]
        if bs and max(bs) - min(bs) > 1:
            return f"time point {k + 1} mixes b-values {min(bs):g} and {max(bs):g} s/mm²"
        gs = np.array([r["gradient"] for r in point if r.get("gradient") is not None])
        if len(gs) and np.abs(gs - gs[0]).max() > 1e-3:
            return f"time point {k + 1} mixes diffusion directions"
    return ""
