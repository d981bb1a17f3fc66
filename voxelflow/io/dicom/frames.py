"""Frames inside one file: enhanced multi-frame images (per-frame functional groups) and
Siemens mosaics (tiles of one image). :func:`expand_frames` turns their records into one
record per frame, so series assembly sees frames as it sees single-frame files."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pydicom

from voxelflow.errors import UnsupportedDataError
from pydicom.multival import MultiValue

from voxelflow.io.dicom.fast_header import convert_value
from voxelflow.io.dicom.values import float_list, integer, number, seconds
from voxelflow.io.dicom.vendor import component, vendor


def _csareader():
    """nibabel's Siemens CSA header reader, imported on first use (mosaics and Siemens DWI
    only) and quietly: nicom warns at import that its *wrappers* are experimental."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader


def mosaic_info(ds: pydicom.Dataset, path: str, rows: int, cols: int) -> dict[str, Any]:
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

    csareader = _csareader()
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
    orientation = float_list(ds, "ImageOrientationPatient", 6)
    corner = float_list(ds, "ImagePositionPatient", 3)
    spacing = float_list(ds, "PixelSpacing", 2)
    step = number(ds, "SpacingBetweenSlices") or number(ds, "SliceThickness")
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



def _group(ds: pydicom.Dataset, shared: pydicom.Dataset | None, frame: pydicom.Dataset, keyword: str):
    """A functional group macro of one frame: its per-frame item, else the shared one."""
    for source in (frame, shared):
        if source is not None and keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    return None


def frame_info(ds: pydicom.Dataset, frames: int) -> list[dict[str, Any]]:
    """Geometry and rescale of every frame of an enhanced (multi-frame) image, from its
    per-frame and shared functional groups (PS3.3 C.7.6.16): position, orientation, pixel
    spacing, slice thickness, rescale, and what tells frames at one position apart (stack,
    temporal position, echo time, frame type). A value no group holds is None."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds and \
        len(ds.SharedFunctionalGroupsSequence) else None
    philips = vendor(str(ds.get("Manufacturer", "") or "")) == "Philips"
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
            "position": float_list(pos, "ImagePositionPatient", 3) if pos is not None else None,
            "orientation": float_list(ori, "ImageOrientationPatient", 6) if ori is not None else None,
            "pixel_spacing": float_list(meas, "PixelSpacing", 2) if meas is not None else None,
            "slice_thickness": number(meas, "SliceThickness") if meas is not None else None,
            "rescale_slope": number(rescale, "RescaleSlope") if rescale is not None else None,
            "rescale_intercept": number(rescale, "RescaleIntercept") if rescale is not None else None,
            "stack": str(content.get("StackID", "")) or None if content is not None else None,
            "temporal_position": integer(content, "TemporalPositionIndex") if content is not None else None,
            "echo_time": number(echo, "EffectiveEchoTime") if echo is not None else None,
            "frame_type": "\\".join(str(v) for v in ftype.get("FrameType", [])) or None if ftype is not None else None,
            "complex_component": str(ftype.get("ComplexImageComponent", "") or "") or None
            if ftype is not None else None,
            "scale_slope": _philips_frame_scale(item) if philips else None,
            "acquisition_time": seconds(str(content.get("FrameAcquisitionDateTime", "") or "")[8:] or None)
            if content is not None else None,
            **_frame_diffusion(_group(ds, shared, item, "MRDiffusionSequence")),
        })
    return out



def _philips_frame_scale(item: pydicom.Dataset) -> float | None:
    """Philips' private scale slope of one frame: in its private (2005,140F) item (the frame's
    classic-header copy), where dcm2niix reads it."""
    private = item.get(0x2005140F)
    if private is None or not len(private.value):
        return None
    elem = private.value[0].get(0x2005100E)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        value = convert_value("Philips_ScaleSlope", "FL", bytes(value))
    try:
        return float(value[0] if isinstance(value, (list, MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _frame_diffusion(item: pydicom.Dataset | None) -> dict[str, Any]:
    """b-value, unit direction (patient frame) and isotropic flag of one frame's
    MRDiffusionSequence item."""
    if item is None or "DiffusionBValue" not in item:
        return {"b_value": None, "gradient": None, "isotropic": None}
    b = number(item, "DiffusionBValue")
    direction = None
    if "DiffusionGradientDirectionSequence" in item and len(item.DiffusionGradientDirectionSequence):
        direction = float_list(item.DiffusionGradientDirectionSequence[0], "DiffusionGradientOrientation", 3)
    vec = np.asarray(direction or [0.0, 0.0, 0.0], float)
    norm = float(np.linalg.norm(vec))
    directionality = str(item.get("DiffusionDirectionality", "") or "").upper()
    isotropic = bool(b) and (directionality == "ISOTROPIC" or (norm < 1e-6 and directionality != "NONE"))
    return {"b_value": b, "gradient": [float(v) for v in vec / norm] if norm >= 1e-6 else [0.0, 0.0, 0.0],
            "isotropic": isotropic}


def siemens_csa_diffusion(ds: pydicom.Dataset) -> tuple[float | None, list[float] | None, bool | None]:
    """b-value and direction of a Siemens image from its CSA image header (``B_value``,
    ``DiffusionGradientDirection``), where classic Siemens DWI (mosaics) keep them."""
    csareader = _csareader()
    try:
        csa = csareader.get_csa_header(ds, "image")
        b = csareader.get_b_value(csa) if csa else None
        g = csareader.get_g_vector(csa) if csa else None
    except Exception:  # noqa: BLE001 - a malformed private header holds no usable value
        return None, None, None
    if b is None:
        return None, None, None
    vec = np.asarray(g if g is not None else [0.0, 0.0, 0.0], float)
    norm = float(np.linalg.norm(vec))
    return float(b), [float(v) for v in vec / norm] if norm >= 1e-6 else [0.0, 0.0, 0.0], \
        bool(b) and norm < 1e-6


def expand_frames(series: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
            image_type = f["frame_type"] or r["image_type"]
            # an uncompressed multi-frame file's frame k lies k frames after its pixel data
            offset = None if r.get("pixel_offset") is None else \
                r["pixel_offset"] + k * r["rows"] * r["cols"] * r["bits_allocated"] // 8
            frame.update({"frame": k, "frames": 1, "pixel_offset": offset,
                          "temporal_position": f["temporal_position"],
                          "echo_number": None if f["echo_time"] is None else round(f["echo_time"] * 1000),
                          "echo_time": r.get("echo_time") if f["echo_time"] is None else f["echo_time"],
                          "acquisition_number": f["stack"],
                          "image_type": image_type,
                          "component": component(image_type, r.get("manufacturer") or "", lambda _: None,
                                                 f.get("complex_component")) or r.get("component") or ""})
            for key in ("scale_slope", "acquisition_time", "b_value", "gradient", "isotropic"):
                if f.get(key) is not None:
                    frame[key] = f[key]
            out.append(frame)
    return out


