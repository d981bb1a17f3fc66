"""Slice timing and phase-encoding polarity, per vendor: what the BIDS sidecar needs beyond
the standard attributes, from the places dcm2niix reads them (Siemens' CSA header and XA
per-frame private items, GE's protocol data block and private polarity, GE's repetition time
between volumes). Each helper takes pydicom datasets of a volume's files."""

from __future__ import annotations

import gzip
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from voxelflow.io.dicom.coerce import int_or as _int_or, integer_or_none as _int, normalise as _normalise, num as _num
from voxelflow.io.dicom.coerce import text as _text


def slice_times_from_csa(volumes: Sequence[pydicom.Dataset]) -> list[float] | None:
    """Slice times of a Siemens mosaic from the CSA image header (0029,1010).

    ``MosaicRefAcqTimes`` (ms) lists one time per tile; tiles are ordered along the CSA
    ``SliceNormalVector``, so they are reversed when that points against the row x column
    normal the export sorts slices by. Which volume's times, as dcm2niix (v1.0.20260724)
    chooses: the first volume's, unless they are implausible (they must vary and span no
    more than the TR: CMRR multiband sequences write bogus times into the first volume) or
    span a different time than the second volume's (its issue 870), when the second volume's
    are taken.

    Args:
        volumes: one mosaic per volume, in acquisition order (the first two suffice).

    Returns:
        Seconds per slice in the export's slice order, or None without usable times.
    """
    if not volumes:
        return None
    tr = _num(_normalise(volumes[0].get("RepetitionTime", 0))) or 0.0
    first = _mosaic_times(volumes[0])
    second = _mosaic_times(volumes[1]) if len(volumes) > 1 else None
    if second and plausible_slice_times(second, tr) and not (
            first and plausible_slice_times(first, tr) and abs(_span(first) - _span(second)) < 1e-6):
        return second
    return first or second


def _span(times: Sequence[float]) -> float:
    return max(times) - min(times)


def _mosaic_times(ds: pydicom.Dataset) -> list[float] | None:
    tags = _csa_tags(ds)
    times = _csa_floats(tags, "MosaicRefAcqTimes")
    if not times:
        return None
    n = _csa_floats(tags, "NumberOfImagesInMosaic")
    if n:
        times = times[:int(n[0])]
    times = [t / 1000.0 for t in times]
    normal = _csa_floats(tags, "SliceNormalVector")
    if len(normal) == 3 and float(np.dot(normal, _slice_normal(ds))) < 0:
        times = times[::-1]
    return times


def phase_polarity_from_csa(ds: pydicom.Dataset) -> int | None:
    """Siemens' ``PhaseEncodingDirectionPositive`` (1/0) from the CSA image header, or None."""
    values = _csa_floats(_csa_tags(ds), "PhaseEncodingDirectionPositive")
    return int(values[0]) if values and values[0] in (0, 1) else None


def slice_times_from_frames(volumes: Sequence[pydicom.Dataset]) -> list[float] | None:
    """Slice times of a Siemens XA enhanced volume from the per-frame ``TimeAfterStart``.

    Siemens XA writes each frame's time after the start of the scan (s) in the private
    (0021,1104) of its "SIEMENS MR SDI 02" block. dcm2niix prefers it to the standard
    FrameAcquisitionDateTime (0018,9074), which Siemens' own de-identification scrambles (and
    which is a time of day), and takes it from the second
    volume when there are several, because the first volume's times can be wrong (its issues
    236, 240); this helper does the same. Frames at a repeated position (a second volume in
    the same file) are skipped.

    Args:
        volumes: one enhanced file per volume, in acquisition order (the first two suffice).

    Returns:
        Seconds per slice in the export's slice order, or None when the frames carry no time.
    """
    if not volumes:
        return None
    ds = volumes[1] if len(volumes) > 1 else volumes[0]
    normal = _slice_normal(ds)
    seen: dict[float, float] = {}
    for item in ds.get("PerFrameFunctionalGroupsSequence") or []:
        time = _siemens_frame_value(item, 0x04)
        try:
            position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
        if time is None:
            return None
        key = round(float(np.dot(normal, position)), 3)
        seen.setdefault(key, float(time))
    if len(seen) < 2:
        return None
    return [seen[k] for k in sorted(seen)]


def phase_polarity_from_frames(ds: pydicom.Dataset) -> int | None:
    """Siemens XA's ``PhaseEncodingDirectionPositive`` (0021,111C) of the first frame, or None."""
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    value = _siemens_frame_value(frames[0], 0x1C) if frames else None
    try:
        polarity = int(float(value))
    except (TypeError, ValueError):
        return None
    return polarity if polarity in (0, 1) else None


def slice_times_ge(volume: Sequence[pydicom.Dataset]) -> list[float] | None:
    """Slice times of a GE EPI volume, computed as dcm2niix computes them (``sliceTimeGE``).

    GE stores no usable per-slice time (the RTIA timer (0021,105E) is coarse and sometimes
    zero), so dcm2niix derives it from the Protocol Data Block (0025,101B, gzip text): the
    slice order (``SLICEORDER``: 0 sequential, else interleaved), the multiband factor
    (``MBACCEL`` or (0043,10B6)), the software release (HyperBand slice order changed in
    27.0 R03), and the epiRT group delay (0043,107C). Slices are excited in the prescribed
    order, which is InstanceNumber order within the volume; the result is re-ordered along
    the slice normal. dcm2niix writes GE slice times only for 2-D series of several volumes:
    call this for those. Multi-phase EPI with variable delays is not supported (as in dcm2niix).

    Args:
        volume: the images of one volume (any order).

    Returns:
        Seconds per slice in the export's slice order, or None.
    """
    images = sorted(volume, key=lambda d: int(d.get("InstanceNumber", 0) or 0))
    if len(images) < 2:
        return None
    first = images[0]
    block = ge_protocol_block(first)
    if block is None or "MPHVAR" in block.get("IOPT", "").upper().replace(" ", ""):
        return None
    tr = float(repetition_time_ge(first) or 0)
    if tr <= 0:
        return None
    group_delay = _ge_group_delay_ms(first)
    mb = max(1, _int_or(block.get("MBACCEL"), 1), _ge_multiband(first))
    major, is27r3 = _ge_version(_text(_normalise(first.get("SoftwareVersions", ""))))
    if mb > 1 and major < 26.0:
        return None  # early HyperBand: order unknown
    interleaved = block.get("SLICEORDER", "").strip() != "0"
    n = len(images)
    excitations = math.ceil(n / mb)
    if mb > 1 and not is27r3 and excitations % 2 == 0:
        excitations += 1  # before 27.0 R03, an even number of excitations gained a blank one
    step = (tr - group_delay) / excitations
    if interleaved:
        n_odd = (excitations - 1) // 2
        # even excitations first (0, 2, 4...), then the odd ones
        times = [(i // 2 if i % 2 == 0 else n_odd + (i + 1) // 2) * step for i in range(excitations)]
        if mb > 1 and is27r3 and excitations > 2 and excitations % 2 == 0:
            times[-1], times[-3] = times[-3], times[-1]
    else:
        times = [i * step for i in range(excitations)]
    normal = _slice_normal(first)
    along = [float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])) for d in images]
    return [times[i % excitations] / 1000.0 for i in sorted(range(n), key=along.__getitem__)]


def repetition_time_ge(ds: pydicom.Dataset) -> float | None:
    """GE's repetition time (ms) between volumes, as dcm2niix reports it: RepetitionTime plus
    the group delay after each volume (epiRT's 0043,107C, or a multi-phase EPI's DELACQ):
    a 2 s TR with a 3 s delay acquires a volume every 5 s. Pass it in ``extra``."""
    tr = _num(_normalise(ds.get("RepetitionTime", "")))
    if tr is None:
        return None
    return tr + _ge_group_delay_ms(ds)


def phase_polarity_ge(ds: pydicom.Dataset) -> int | None:
    """GE phase-encoding polarity (1 unflipped, 0 flipped), as dcm2niix reads it.

    RectilinearPhaseEncodeReordering (0018,9034, from release 27): LINEAR is flipped,
    REVERSE_LINEAR unflipped (dcm2niix issue 674). Before that, the EPI flags of the user
    defined data block (0043,102A): bit 0x0004 of the word at 0x30 of its header is the
    polarity, and a bottom-up view order (word at 0x394) reverses it.
    """
    polarity = ge_reordering_polarity(_normalise(ds.get("RectilinearPhaseEncodeReordering", "")))
    if polarity is not None:
        return polarity
    raw = _private(ds, 0x0043, "GEMS_PARM_01", 0x2A)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 916:
        return None
    offset = int.from_bytes(raw[24:26], "little")
    if len(raw) < offset + 916:
        return None
    version = float(np.frombuffer(raw[offset:offset + 4], "<f4")[0])
    if not 5.0 <= version <= 40.0:
        return None
    header, view_order = offset, 0x0394
    if version >= 25.002:
        header += 0x004C
        view_order -= 0x008C
    def word(at: int) -> int:
        return int.from_bytes(raw[header + at:header + at + 2], "little")

    if not word(0x003A) & 0x0800:
        return None  # not EPI
    flipped = bool(word(0x0030) & 0x0004)
    if word(view_order) == 2:  # bottom-up
        flipped = not flipped
    return 0 if flipped else 1


def ge_protocol_block(ds: pydicom.Dataset) -> dict[str, str] | None:
    """GE's Protocol Data Block (0025,101B): gzip text of ``KEY "value"`` lines, as a dict."""
    raw = _private(ds, 0x0025, "GEMS_SERS_01", 0x1B)
    if not isinstance(raw, (bytes, bytearray)):
        return None
    start = raw.find(b"\x1f\x8b")
    if start < 0:
        return None
    try:
        text = gzip.decompress(raw[start:]).decode("latin-1")
    except (OSError, EOFError):
        return None
    block = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            block[key] = value.strip().strip('"')
    return block


def plausible_slice_times(times: Sequence[float], repetition_time_ms: float) -> bool:
    """Whether slice times (s) look real: they vary and span less than the TR (dcm2niix's
    checkSliceTiming). A TR of 0 means unknown."""
    if len(times) < 2:
        return False
    span = max(times) - min(times)
    return span > 0 and (repetition_time_ms <= 0 or span <= repetition_time_ms / 1000.0)


def complex_component_ge(ds: pydicom.Dataset) -> str | None:
    """What a GE image's values are, from GE's private image type (0043,102F: 0 magnitude,
    1 phase, 2 real, 3 imaginary), as a ComplexImageComponent value for ``extra``."""
    value = _int(_private(ds, 0x0043, "GEMS_PARM_01", 0x2F))
    return {0: "MAGNITUDE", 1: "PHASE", 2: "REAL", 3: "IMAGINARY"}.get(value) if value is not None else None


def ge_reordering_polarity(value: Any) -> int | None:
    text = _text(value).upper()
    if text.startswith("L"):
        return 0
    if text.startswith("R"):
        return 1
    return None


def _ge_group_delay_ms(ds: pydicom.Dataset) -> float:
    """GE's group delay (ms) after each volume: epiRT's (0043,107C) in seconds, else a
    multi-phase EPI's DELACQ of the protocol block in seconds ("Minimum" means none)."""
    value = _private(ds, 0x0043, "GEMS_PARM_01", 0x7C)
    if value is None:
        block = ge_protocol_block(ds) or {}
        value = block.get("DELACQ") if "MPH" in block.get("IOPT", "").upper() else None
    try:
        return max(0.0, float(value) * 1000.0)
    except (TypeError, ValueError):
        return 0.0


def _ge_multiband(ds: pydicom.Dataset) -> int:
    value = _private(ds, 0x0043, "GEMS_PARM_01", 0xB6)
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if value else None
    return _int_or(value, 1)


def _ge_version(software: str) -> tuple[float, bool]:
    """(major.minor, is 27.0 R03 or later) from GE's SoftwareVersions, e.g.
    ``28\\LX\\MR Software release:DV28.0_R02_1947.a`` -> (28.0, True)."""
    text = software.split(":")[-1] if ":" in software else software.split("\\")[-1]
    try:
        major, rest = text[2:].split(".", 1)
        minor, release = rest.split("_")[:2]
        version = int(major) + 0.1 * int(minor[:1])
        number = 0 if release.upper() == "EA" else int(release.lstrip("Rr") or 0)
    except (ValueError, IndexError):
        return 0.0, False
    return version, version >= 27.1 or (int(major) == 27 and number >= 3)


def _siemens_frame_value(item: pydicom.Dataset, element: int) -> Any:
    """A value of the "SIEMENS MR SDI 02" block nested in a Siemens XA per-frame item."""
    for outer in item:
        if outer.tag.group != 0x0021 or outer.VR != "SQ" or not outer.value:
            continue
        value = _private(outer.value[0], 0x0021, "SIEMENS MR SDI 02", element)
        if value is not None:
            return value
    return None


def _private(ds: pydicom.Dataset, group: int, creator: str, element: int) -> Any:
    try:
        return ds.private_block(group, creator)[element].value
    except (KeyError, ValueError):
        return None


def _csa_tags(ds: pydicom.Dataset) -> dict[str, Any]:
    import warnings

    with warnings.catch_warnings():  # nicom warns at import that its *wrappers* are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    try:
        header = csareader.get_csa_header(ds, "image")
    except Exception:  # noqa: BLE001 - a malformed private header reads as absent
        return {}
    return (header or {}).get("tags", {})


def _csa_floats(tags: Mapping[str, Any], name: str) -> list[float]:
    items = (tags.get(name) or {}).get("items") or []
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return []


def _slice_normal(ds: pydicom.Dataset) -> np.ndarray:
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None:
        for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            try:
                orientation = ds.get(name)[0].PlaneOrientationSequence[0].ImageOrientationPatient
                break
            except (TypeError, AttributeError, IndexError):
                continue
    if orientation is None:
        return np.array([0.0, 0.0, 1.0])
    o = [float(v) for v in orientation]
    return np.cross(o[:3], o[3:6])
