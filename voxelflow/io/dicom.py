"""DICOM: header scanning, series assembly and pixel loading.

Three steps, each a pure function so it runs anywhere (a Dask worker, a test, a notebook):

1. :func:`scan_dicom` reads one file's header (no pixel data) into a flat
   :class:`dict` record holding technical values and keyed pseudonyms only.
2. :func:`plan_series` takes the records of one series and splits them into stacks
   (:class:`StackPlan`): one orientation and matrix, one image per slice position, slices
   sorted along the normal and evenly spaced. Anything inconsistent raises
   :class:`~voxelflow.errors.SeriesAssemblyError` with the reason.
3. :func:`load_stack` decodes the pixels of a planned stack, applies the modality rescale and
   returns a lossless array.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pydicom.multival import MultiValue

from voxelflow.deid import TECHNICAL_ATTRIBUTES, pseudonym
from voxelflow.errors import (
    CorruptFileError,
    NotAnImageError,
    PixelDecodeError,
    SeriesAssemblyError,
    UnsupportedDataError,
)
from voxelflow.geometry import dicom_affine, slice_normal
from voxelflow.io.dicom_header import read_header

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Native little-endian pixel data that can be read straight from the file by offset.
DIRECT_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
UNCOMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
}

# Tolerances for stacking. Positions are written as decimal strings of at most 16
# characters, so exact equality cannot be expected; anything beyond these is real.
ORIENTATION_TOL = 1e-4  # direction cosine components
POSITION_TOL_MM = 0.01  # absolute, mm
SPACING_REL_TOL = 0.005  # relative deviation of one gap from the mean gap


def _float_list(ds: pydicom.Dataset, keyword: str, n: int) -> list[float] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = _float(ds, keyword)
    return None if value is None else int(round(value))


def _technical_attributes(ds: pydicom.Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyword in TECHNICAL_ATTRIBUTES:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, (list, MultiValue)):
            value = [str(v) for v in value]
        elif isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.IS, float, int)):
            value = float(value)
        else:
            value = str(value)
        out[keyword] = value
    return out


def looks_like_dicom(head: bytes) -> bool:
    """True for a Part 10 file (``DICM`` at 128) or a bare dataset starting with a group
    0002/0008 tag (some old exports omit the preamble)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


class _PydicomHeader:
    """A file parsed by pydicom, seen through the interface of
    :class:`~voxelflow.io.dicom_header.FastHeader`."""

    def __init__(self, ds: pydicom.Dataset):
        self.dataset = ds
        self.file_meta = ds.file_meta if hasattr(ds, "file_meta") else {}
        self.n_elements = len(ds)
        self.pixel_keyword = next((kw for kw in PIXEL_KEYWORDS if kw in ds), None)
        self.pixel_length = self.pixel_tell = None
        if self.pixel_keyword is None:
            return
        # The raw element as parsed: asking the dataset for it (get_item, []) would read the
        # deferred pixel bytes from disk, which is the cost deferring avoids.
        raw = ds._dict.get(pydicom.tag.Tag(self.pixel_keyword)) if hasattr(ds, "_dict") else None
        if raw is None:
            raw = ds.get_item(self.pixel_keyword)
        # Deferred values come back raw (length + file offset); small ones already read.
        length = getattr(raw, "length", None)
        self.pixel_tell = getattr(raw, "value_tell", None)
        if length is None and isinstance(getattr(raw, "value", None), (bytes, bytearray)):
            length = len(raw.value)
        if getattr(raw, "is_undefined_length", False):
            length = 0xFFFFFFFF
        self.pixel_length = length

    def get(self, keyword: str, default: Any = None) -> Any:
        return self.dataset.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.dataset


HEAD_BYTES = 1 << 20  # the fast reader's window: headers longer than this go to pydicom


def scan_dicom(local: str, path: str, key: bytes, head: bytes | None = None, fast: bool = True) -> dict[str, Any]:
    """Read one DICOM file's header into a de-identified record.

    Args:
        local: where to read the file.
        path: the file's path relative to its source root (for messages).
        key: the store's pseudonymisation key.
        head: the file's first bytes if already read (at least :data:`HEAD_BYTES`, or the
            whole file).
        fast: try :mod:`voxelflow.io.dicom_header` before pydicom (``False``: pydicom only;
            both give the same record).

    Returns:
        A flat record (see the module docstring); identifiers appear only as pseudonyms.

    Raises:
        CorruptFileError: the file cannot be parsed or is truncated.
        NotAnImageError: a DICOM object without pixel data (DICOMDIR, SR, RTSTRUCT, ...).
        UnsupportedDataError: an image voxelflow does not convert (yet).
    """
    ds = None
    if fast:
        if head is None:
            with open(local, "rb") as fh:
                head = fh.read(HEAD_BYTES)
        ds = read_header(head)
    if ds is None:
        try:
            ds = _PydicomHeader(pydicom.dcmread(local, defer_size=256, force=True))
            # Touch the elements we need now: a truncated header fails here, not later.
            ds.get("SOPClassUID", "")
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
                AttributeError, OverflowError, IndexError) as exc:
            raise CorruptFileError(path, f"DICOM header cannot be parsed ({type(exc).__name__}: {exc})") from None
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if ds.n_elements == 0:
        raise CorruptFileError(path, "no DICOM data elements could be read")
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise NotAnImageError(path, "DICOMDIR (media directory index, holds no image)")
    if not sop_class:
        raise CorruptFileError(path, "neither SOPClassUID nor MediaStorageSOPClassUID could be read: "
                                     "not a valid DICOM object")
    if sop_class == SEGMENTATION_SOP_CLASS:
        raise NotAnImageError(path, "DICOM-SEG segmentation, not an image: attach it to its image with "
                                    "`voxelflow labels`")
    pixel_kw = ds.pixel_keyword
    if pixel_kw is None:
        raise NotAnImageError(path, f"no pixel data (SOP class: {pydicom.uid.UID(sop_class).name})")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not series_uid:
        raise CorruptFileError(path, "SeriesInstanceUID is missing; the image cannot be grouped into a series")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols:
        raise CorruptFileError(path, f"Rows/Columns missing or zero (Rows={rows}, Columns={cols})")

    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    samples = _int(ds, "SamplesPerPixel") or 1
    bits = _int(ds, "BitsAllocated") or 0
    frames = _int(ds, "NumberOfFrames") or 1
    # A truncated file still parses with deferred pixel data; check the byte count.
    length, tell = ds.pixel_length, ds.pixel_tell
    size = os.path.getsize(local)
    deflated = syntax == "1.2.840.10008.1.2.1.99"  # offsets point into the inflated stream
    if tell is not None and not deflated and length not in (None, 0xFFFFFFFF) and tell + length > size:
        raise CorruptFileError(
            path, f"file is truncated: {pixel_kw} needs {length} bytes from offset {tell}, "
                  f"the file has {size} bytes")
    if pixel_kw == "PixelData" and syntax in UNCOMPRESSED_SYNTAXES and length not in (None, 0xFFFFFFFF):
        expected = rows * cols * samples * frames * bits // 8
        if length < expected:
            raise CorruptFileError(
                path, f"PixelData holds {length} bytes, expected {expected} "
                      f"({rows}x{cols}x{samples} samples x {frames} frames x {bits} bits)")

    # Where the pixels of a plain little-endian file lie, so the conversion can read them
    # without parsing the file again (pydicom's full parse costs ~1 ms per file).
    bits_stored = _int(ds, "BitsStored") or bits
    high_bit = _int(ds, "HighBit")
    direct = (pixel_kw == "PixelData" and syntax in DIRECT_SYNTAXES and tell is not None
              and bits in (8, 16, 32) and frames == 1 and samples == 1
              and length not in (None, 0xFFFFFFFF) and length >= rows * cols * bits // 8
              and (high_bit is None or high_bit == bits_stored - 1))
    image_type = ds.get("ImageType")
    image_type = "\\".join(str(v) for v in image_type) if isinstance(image_type, (list, MultiValue)) \
        else str(image_type or "")
    mosaic = None
    if "MOSAIC" in image_type.upper().split("\\"):
        if getattr(ds, "dataset", None) is None:  # the fast reader skips private tags: the CSA header
            ds = _PydicomHeader(pydicom.dcmread(local, defer_size=256, force=True))
        mosaic = _mosaic_info(ds.dataset, path, rows, cols)
        direct = False
    patient_key = str(ds.get("PatientID", "") or "")
    if not patient_key:
        patient_key = f"{ds.get('PatientName', '')}|{ds.get('PatientBirthDate', '')}"
    if patient_key in ("", "|"):
        patient_key = "study:" + str(ds.get("StudyInstanceUID", "") or series_uid)
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    return {
        "series": pseudonym(key, "series", series_uid),
        "patient": pseudonym(key, "patient", patient_key),
        "study": pseudonym(key, "study", study_uid or series_uid),
        "instance": pseudonym(key, "instance", sop_uid) if sop_uid else "",
        "modality": str(ds.get("Modality", "") or "OT"),
        "sop_class": pydicom.uid.UID(sop_class).name if sop_class else "",
        "transfer_syntax": syntax,
        "rows": rows,
        "cols": cols,
        "samples": samples,
        "bits_allocated": bits,
        "bits_stored": bits_stored,
        "pixel_offset": tell if direct else None,
        "pixel_representation": _int(ds, "PixelRepresentation") or 0,
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "frames": frames,
        "orientation": _float_list(ds, "ImageOrientationPatient", 6),
        "position": _float_list(ds, "ImagePositionPatient", 3),
        "pixel_spacing": _float_list(ds, "PixelSpacing", 2),
        "slice_thickness": _float(ds, "SliceThickness"),
        "spacing_between_slices": _float(ds, "SpacingBetweenSlices"),
        "instance_number": _int(ds, "InstanceNumber"),
        "acquisition_number": _int(ds, "AcquisitionNumber"),
        "echo_number": _int(ds, "EchoNumbers"),
        "temporal_position": _int(ds, "TemporalPositionIdentifier"),
        "acquisition_time": _seconds(ds.get("AcquisitionTime") or ds.get("ContentTime")),
        "repetition_time": _float(ds, "RepetitionTime"),
        "image_type": image_type,
        "rescale_slope": _float(ds, "RescaleSlope"),
        "rescale_intercept": _float(ds, "RescaleIntercept"),
        "attributes": json.dumps(_technical_attributes(ds), sort_keys=True),
        "frame_info": json.dumps(_frame_info(ds.dataset, frames))
        if frames > 1 and "PerFrameFunctionalGroupsSequence" in ds else None,
    } | (mosaic or {})


def _mosaic_info(ds: pydicom.Dataset, path: str, rows: int, cols: int) -> dict[str, Any]:
    """Record fields of a Siemens mosaic: its tiles as frames, each with the position of its
    slice. The CSA image header (read by nibabel's ``nicom``) gives the number of slices and
    the slice normal; tiles fill rows of ``ceil(sqrt(n))`` tiles of ``Rows // ceil(sqrt(n))``
    pixels (an image a few pixels wider than the grid of tiles: the rest is padding).
    ImagePositionPatient is the corner of the whole mosaic; the first slice's corner is moved
    by half the difference between mosaic and tile size along rows and columns (as nibabel
    and dcm2niix do). Slice k lies at ``first + k * spacing * normal``.

    Raises:
        UnsupportedDataError: no usable CSA header, or the geometry is incomplete.
    """
    import math
    import warnings

    with warnings.catch_warnings():  # nicom warns at import that its *wrappers* are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader

    try:
        csa = csareader.get_csa_header(ds, "image")
        n = csareader.get_n_mosaic(csa) if csa else None
        normal = csareader.get_slice_normal(csa) if csa else None
    except Exception as exc:  # noqa: BLE001 - a malformed private header
        raise UnsupportedDataError(path, f"Siemens mosaic whose CSA header cannot be read "
                                         f"({type(exc).__name__}: {exc}); not converted") from None
    if not n or normal is None:
        raise UnsupportedDataError(path, "Siemens mosaic without NumberOfImagesInMosaic / SliceNormalVector "
                                         "in its CSA image header: the slices cannot be placed; not converted")
    orientation = _float_list(ds, "ImageOrientationPatient", 6)
    corner = _float_list(ds, "ImagePositionPatient", 3)
    spacing = _float_list(ds, "PixelSpacing", 2)
    step = _float(ds, "SpacingBetweenSlices") or _float(ds, "SliceThickness")
    if orientation is None or corner is None or spacing is None or not step:
        raise UnsupportedDataError(path, "Siemens mosaic without ImageOrientationPatient, ImagePositionPatient, "
                                         "PixelSpacing or slice spacing: not converted")
    per_side = math.ceil(math.sqrt(n))
    tile = (rows // per_side, cols // per_side)
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    # Moving down rows goes along the column cosine, across columns along the row cosine.
    # The shift uses Rows / tiles per side unrounded, as nibabel's MosaicWrapper and dcm2niix
    # do (the same as the tile size whenever the mosaic is an exact grid of tiles).
    first = (np.asarray(corner) + col_dir * spacing[0] * (rows - rows / per_side) / 2
             + row_dir * spacing[1] * (cols - cols / per_side) / 2)
    normal = np.asarray(normal, float)
    frames = [{"position": [float(v) for v in first + k * step * normal], "orientation": orientation}
              for k in range(n)]
    return {"frames": n, "rows": tile[0], "cols": tile[1], "pixel_offset": None,
            "mosaic": [per_side, tile[0], tile[1]], "frame_info": json.dumps(frames)}


def unmosaic(image: np.ndarray, per_side: int, tile_rows: int, tile_cols: int, n: int) -> np.ndarray:
    """The ``(n, tile_rows, tile_cols)`` slices of a mosaic image, in tile order."""
    tiles = image[:per_side * tile_rows, :per_side * tile_cols]
    tiles = tiles.reshape(per_side, tile_rows, per_side, tile_cols).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(tiles.reshape(per_side * per_side, tile_rows, tile_cols)[:n])


def _seconds(value) -> float | None:
    """A DICOM TM (HHMMSS.FFFFFF) as seconds after midnight; None when absent or malformed."""
    text = str(value or "").strip().replace(":", "")
    try:
        return int(text[0:2]) * 3600 + int(text[2:4] or 0) * 60 + float(text[4:] or 0) if len(text) >= 2 else None
    except ValueError:
        return None


def _group(ds: pydicom.Dataset, shared: pydicom.Dataset | None, frame: pydicom.Dataset, keyword: str):
    """A functional group macro of one frame: its per-frame item, else the shared one."""
    for source in (frame, shared):
        if source is not None and keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    return None


def _frame_info(ds: pydicom.Dataset, frames: int) -> list[dict[str, Any]]:
    """Geometry and rescale of every frame of an enhanced (multi-frame) image, from its
    per-frame and shared functional groups (PS3.3 C.7.6.16): position, orientation, pixel
    spacing, slice thickness, rescale, and what tells frames at one position apart (stack,
    temporal position, echo time, frame type). A value no group holds is None."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds and \
        len(ds.SharedFunctionalGroupsSequence) else None
    out = []
    for k in range(min(frames, len(per_frame))):
        item = per_frame[k]
        pos = _group(ds, shared, item, "PlanePositionSequence")
        ori = _group(ds, shared, item, "PlaneOrientationSequence")
        meas = _group(ds, shared, item, "PixelMeasuresSequence")
        rescale = _group(ds, shared, item, "PixelValueTransformationSequence")
        content = _group(ds, shared, item, "FrameContentSequence")
        echo = _group(ds, shared, item, "MREchoSequence")
        ftype = _group(ds, shared, item, "CTImageFrameTypeSequence") or _group(ds, shared, item, "MRImageFrameTypeSequence")
        out.append({
            "position": _float_list(pos, "ImagePositionPatient", 3) if pos is not None else None,
            "orientation": _float_list(ori, "ImageOrientationPatient", 6) if ori is not None else None,
            "pixel_spacing": _float_list(meas, "PixelSpacing", 2) if meas is not None else None,
            "slice_thickness": _float(meas, "SliceThickness") if meas is not None else None,
            "rescale_slope": _float(rescale, "RescaleSlope") if rescale is not None else None,
            "rescale_intercept": _float(rescale, "RescaleIntercept") if rescale is not None else None,
            "stack": str(content.get("StackID", "")) or None if content is not None else None,
            "temporal_position": _int(content, "TemporalPositionIndex") if content is not None else None,
            "echo_time": _float(echo, "EffectiveEchoTime") if echo is not None else None,
            "frame_type": "\\".join(str(v) for v in ftype.get("FrameType", [])) or None if ftype is not None else None,
        })
    return out


# ----------------------------------------------------------------------------- assembly


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


def _geometry_key(rec: dict[str, Any]) -> tuple:
    orient = tuple(round(v / ORIENTATION_TOL) for v in rec["orientation"])
    spacing = tuple(round(v, 4) for v in rec["pixel_spacing"])
    return (orient, rec["rows"], rec["cols"], spacing)


def _describe_key(key: tuple, n_keys: int) -> str:
    orient, rows, cols, spacing = key
    return f"{rows}x{cols} @ {spacing[0]:g}x{spacing[1]:g} mm, orientation " + \
        ",".join(f"{v * ORIENTATION_TOL:.3f}" for v in orient) if n_keys > 1 else ""


# Attributes that tell apart several images at one slice position, in the order tried.
_DISTINGUISHERS = ("echo_number", "image_type", "acquisition_number", "temporal_position", "mosaic_volume")


def _positions_unique(recs: list[dict[str, Any]], normal: np.ndarray) -> bool:
    d = sorted(float(np.dot(normal, r["position"])) for r in recs)
    return all(b - a > POSITION_TOL_MM for a, b in zip(d, d[1:]))


def _split_repeats(series: str, recs: list[dict[str, Any]], normal: np.ndarray) -> list[tuple[str, list]]:
    mosaics: dict[Any, list] = defaultdict(list)
    for r in recs:
        mosaics[r.get("mosaic_volume")].append(r)
    if len(mosaics) > 1 and None not in mosaics:  # each mosaic file is a volume of its own
        return [(f"mosaic_volume={k}", g) for k, g in sorted(mosaics.items())]
    if _positions_unique(recs, normal):
        return [("", recs)]
    for attr in _DISTINGUISHERS:
        groups: dict[Any, list] = defaultdict(list)
        for r in recs:
            groups[r.get(attr)].append(r)
        if len(groups) > 1 and all(_positions_unique(g, normal) for g in groups.values()):
            return [(f"{attr}={k}", g) for k, g in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    counts = defaultdict(int)
    for r in recs:
        counts[round(float(np.dot(normal, r["position"])) / POSITION_TOL_MM)] += 1
    worst = max(counts.values())
    raise SeriesAssemblyError(
        f"series {series}",
        f"{len(recs)} images over {len(counts)} slice positions (up to {worst} at one position) "
        f"and no attribute ({', '.join(_DISTINGUISHERS)}) separates them into stacks")


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


def _expand_frames(series: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per frame for enhanced multi-frame images (each frame with its own geometry
    and rescale from the functional groups, ``frame`` its index); single-frame records as they
    are.

    Raises:
        UnsupportedDataError: a multi-frame image without per-frame geometry (its slice
            positions would have to be guessed).
    """
    out = []
    mosaic_count = 0
    for r in records:
        if r["frames"] <= 1:
            out.append(r)
            continue
        info = json.loads(r["frame_info"]) if r.get("frame_info") else None
        if r.get("mosaic"):  # tiles: each its own position; the file's other values hold for all
            # A mosaic file is one volume: its number tells it from the series' other mosaics
            # (a 4-D series when they repeat the same slices, else separate volumes).
            number = r["instance_number"] if r["instance_number"] is not None else mosaic_count + 1
            mosaic_count += 1
            out.extend(dict(r) | {"position": f["position"], "orientation": f["orientation"], "frame": k,
                                  "frames": 1, "mosaic_frames": r["frames"], "mosaic_volume": number}
                       for k, f in enumerate(info))
            continue
        if not info or len(info) != r["frames"] or any(f["position"] is None or f["orientation"] is None
                                                       for f in info):
            raise UnsupportedDataError(
                r["path"], f"multi-frame image ({r['frames']} frames, {r['sop_class'] or 'unknown SOP class'}) "
                           "without per-frame positions and orientations (PerFrameFunctionalGroupsSequence); "
                           "slice positions would have to be guessed, so it is not converted")
        for k, f in enumerate(info):
            frame = dict(r)
            frame.update({key: f[key] for key in ("position", "orientation") if f[key] is not None})
            for key in ("pixel_spacing", "slice_thickness", "rescale_slope", "rescale_intercept"):
                if f[key] is not None:
                    frame[key] = f[key]
            frame.update({"frame": k, "frames": 1, "pixel_offset": None,
                          "temporal_position": f["temporal_position"],
                          "echo_number": None if f["echo_time"] is None else round(f["echo_time"] * 1000),
                          "acquisition_number": f["stack"],
                          "image_type": f["frame_type"] or r["image_type"]})
            out.append(frame)
    return out


def plan_series(series: str, records: list[dict[str, Any]]) -> list[StackPlan]:
    """Split one series' records into consistent stacks.

    Raises:
        SeriesAssemblyError: the images cannot be stacked consistently (the reason says why).
        UnsupportedDataError: multi-frame images without per-frame geometry.
        NotAnImageError: color images (screen captures, photos): not a volume.
    """
    if any(r["samples"] != 1 for r in records):
        raise NotAnImageError(
            f"series {series}", f"color images (SamplesPerPixel={records[0]['samples']}, "
                                f"{records[0]['photometric']}) are not a volume")
    records = _expand_frames(series, records)
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
        repeats = _split_repeats(series, recs, normal)
        four_d = _as_time_series(series, base, repeats, normal)
        if four_d is not None:
            plans.append(four_d)
            continue
        for label, sub in repeats:
            full = "; ".join(x for x in (base, label) if x)
            for part, run, note in _split_gaps(series, full, sub, normal):
                plan = _build_stack(series, "; ".join(x for x in (full, part) if x), run, normal)
                plan.warnings.extend([note] if note else [])
                plans.append(plan)
    return plans


_TIME_ATTRIBUTES = ("temporal_position", "acquisition_number", "mosaic_volume")


def _as_time_series(series: str, base: str, groups: list[tuple[str, list]], normal: np.ndarray) -> StackPlan | None:
    """One 4-D plan when the images at each slice position are repeats over time: the groups
    differ only by TemporalPositionIdentifier or AcquisitionNumber and cover the same slice
    positions. Time points are ordered by acquisition time where every image has one, else by
    that attribute; the time step is the median difference of the time points' acquisition
    times (else RepetitionTime for MR, else unknown)."""
    if len(groups) < 2 or not groups[0][0] or groups[0][0].split("=")[0] not in _TIME_ATTRIBUTES:
        return None
    stacks = [_build_stack(series, base, recs, normal) for _, recs in groups]
    if any(s.offsets is not None for s in stacks):
        return None  # resampled stacks stay separate volumes
    first = stacks[0]
    for s in stacks[1:]:
        if s.shape != first.shape or not np.allclose(s.affine, first.affine, atol=POSITION_TOL_MM):
            return None  # not the same slices: separate volumes
    attr = groups[0][0].split("=")[0]

    def when(stack: StackPlan) -> float | None:
        times = [r.get("acquisition_time") for r in stack.files]
        return min(times) if all(t is not None for t in times) else None

    times = [when(s) for s in stacks]
    if all(t is not None for t in times) and len(set(times)) == len(times):
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


def _split_gaps(series: str, label: str, recs: list[dict[str, Any]], normal: np.ndarray) -> list[tuple[str, list, str]]:
    """Split a stack at missing slices into evenly spaced runs: ``[(part label, records,
    warning)]``. A gap counts as missing slices when it is wider than the median gap; the
    runs must each hold two or more slices. Anything else (unevenly spaced slices) is left to
    :func:`_build_stack`, which refuses it with the gaps it saw."""
    if len(recs) < 4:
        return [("", recs, "")]
    recs = sorted(recs, key=lambda r: float(np.dot(normal, r["position"])))
    d = np.array([float(np.dot(normal, r["position"])) for r in recs])
    gaps = np.diff(d)
    median = float(np.median(gaps))
    tol = max(POSITION_TOL_MM, SPACING_REL_TOL * median)
    breaks = np.flatnonzero(np.abs(gaps - median) > tol)
    if not len(breaks) or median <= 0 or (gaps[breaks] < median).any():
        return [("", recs, "")]
    bounds = [0, *(int(b) + 1 for b in breaks), len(recs)]
    runs = [recs[a:b] for a, b in zip(bounds, bounds[1:])]
    if len(runs) > MAX_GAP_PARTS or min(len(r) for r in runs) < 2:
        return [("", recs, "")]
    where = "; ".join(f"{gaps[b]:.4g} mm after slice {int(b)} (about {gaps[b] / median - 1:.3g} missing)"
                      for b in breaks)
    note = (f"missing slices: gaps of {where}, against {median:.4g} mm between the other slices; the stack is "
            f"split into {len(runs)} evenly spaced volumes rather than given one spacing")
    return [(f"part {i + 1} of {len(runs)} (slices {bounds[i]}-{bounds[i + 1] - 1})", run, note)
            for i, run in enumerate(runs)]


# ----------------------------------------------------------------------------- pixels


def _read_direct(rec: dict[str, Any]) -> np.ndarray:
    """Pixels of a plain little-endian file read by offset, with pydicom's semantics for
    BitsStored < BitsAllocated: unsigned values are masked, signed ones sign-extended."""
    bits, stored = rec["bits_allocated"], rec["bits_stored"]
    signed = rec["pixel_representation"] == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    n = rec["rows"] * rec["cols"]
    try:
        arr = np.fromfile(rec["local"], dtype=dtype, count=n, offset=rec["pixel_offset"])
    except OSError as exc:
        raise CorruptFileError(rec["path"], f"pixel data cannot be read: {exc}") from None
    if arr.size != n:
        raise CorruptFileError(rec["path"], f"file is truncated: {arr.size} of {n} pixels present")
    if stored < bits:
        shift = bits - stored
        unsigned = arr.view(dtype.newbyteorder("=").str.replace("i", "u"))
        if signed:
            arr = (unsigned << shift).view(arr.dtype) >> shift
        else:
            arr = unsigned & ((1 << stored) - 1)
    return arr.reshape(rec["rows"], rec["cols"])


def _read_pixels(local: str, path: str) -> tuple[np.ndarray, float, float]:
    try:
        ds = pydicom.dcmread(local, force=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is this file's fault
        raise CorruptFileError(path, f"DICOM cannot be re-read ({type(exc).__name__}: {exc})") from None
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise PixelDecodeError(path, f"pixel data cannot be decoded ({name}): {type(exc).__name__}: {exc}") from None
    slope = _float(ds, "RescaleSlope")
    intercept = _float(ds, "RescaleIntercept")
    return arr, (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _lossless_dtype(lo: float, hi: float, integral: bool) -> np.dtype:
    if integral:
        for dt in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dt)
        return np.dtype(np.int64)
    return np.dtype(np.float32)


def load_stack(plan: StackPlan, direct: bool = True) -> np.ndarray:
    """Decode and rescale the pixels of a planned stack into a ``(slices, rows, cols)`` array.

    The dtype is the smallest that holds the rescaled values exactly: int16 when they fit,
    else uint16 / int32; float32 when slope or intercept are fractional and float32 is exact,
    else float64.

    Args:
        plan: the stack to load.
        direct: read plain little-endian pixels by their offset (False: always decode with
            pydicom; both give the same voxels, the tests check it).

    Raises:
        PixelDecodeError / CorruptFileError: a file's pixels cannot be read (names the file).
    """
    raws: list[np.ndarray] = []
    scales: list[tuple[float, float]] = []
    decoded: dict[str, np.ndarray] = {}  # multi-frame files, decoded once for all their frames
    for rec in plan.files:
        if rec.get("frame") is not None:
            if rec["local"] not in decoded:
                decoded[rec["local"]] = _read_pixels(rec["local"], rec["path"])[0]
                if rec.get("mosaic"):
                    decoded[rec["local"]] = unmosaic(decoded[rec["local"]], *rec["mosaic"], rec["mosaic_frames"])
            frames = decoded[rec["local"]]
            arr = frames[rec["frame"]] if frames.ndim == 3 else frames
            slope = 1.0 if rec["rescale_slope"] is None else rec["rescale_slope"]
            intercept = 0.0 if rec["rescale_intercept"] is None else rec["rescale_intercept"]
        elif direct and rec.get("pixel_offset") is not None:
            arr = _read_direct(rec)
            slope = 1.0 if rec["rescale_slope"] is None else rec["rescale_slope"]
            intercept = 0.0 if rec["rescale_intercept"] is None else rec["rescale_intercept"]
        else:
            arr, slope, intercept = _read_pixels(rec["local"], rec["path"])
        if arr.shape != tuple(plan.shape[1:]):
            raise SeriesAssemblyError(rec["path"], f"pixel array shape {arr.shape} differs from "
                                                   f"Rows x Columns {plan.shape[1:]}")
        raws.append(arr)
        scales.append((slope, intercept))
    integral = all(float(s).is_integer() and float(i).is_integer() for s, i in scales) \
        and all(a.dtype.kind in "iu" for a in raws)
    ends = [(float(a.min()) * s + i, float(a.max()) * s + i) for a, (s, i) in zip(raws, scales)]
    lo, hi = min(min(e) for e in ends), max(max(e) for e in ends)
    dtype = _lossless_dtype(lo, hi, integral)
    out = np.empty((len(raws), *plan.shape[1:]), dtype=dtype)
    for k, (a, (s, i)) in enumerate(zip(raws, scales)):
        if integral:
            # The output dtype holds every rescaled value, so computing in it is exact.
            if s == 1:
                np.add(a, int(i), out=out[k], dtype=dtype, casting="unsafe")
            else:
                out[k] = a.astype(np.int64) * int(s) + int(i)
        else:
            exact = a.astype(np.float64) * s + i
            if dtype == np.float32 and not np.array_equal(exact.astype(np.float32), exact):
                out = out.astype(np.float64)
                dtype = np.dtype(np.float64)
            out[k] = exact
    if plan.timepoints > 1:  # (t * z, y, x) -> (t, z, y, x)
        return out.reshape(plan.timepoints, plan.shape[0], *plan.shape[1:])
    if plan.offsets is not None:
        return resample_slices(out, plan.offsets, plan.shape[0])
    return out
