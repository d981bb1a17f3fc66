"""Pixels: decode and rescale the files of a planned stack into one lossless array."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom

from voxelflow.errors import CorruptFileError, PixelDecodeError, SeriesAssemblyError
from voxelflow.io.dicom.assembly import StackPlan, resample_slices
from voxelflow.io.dicom.frames import unmosaic
from voxelflow.io.dicom.values import number
from voxelflow.io.dicom.vendor import philips_precise


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
    slope = number(ds, "RescaleSlope")
    intercept = number(ds, "RescaleIntercept")
    return arr, (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _lossless_dtype(lo: float, hi: float, integral: bool) -> np.dtype:
    if integral:
        for dt in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dt)
        return np.dtype(np.int64)
    return np.dtype(np.float32)


def _load_colour(plan: StackPlan) -> np.ndarray:
    """The RGB voxels of a colour stack, ``(3, slices, rows, cols)`` uint8 (NGFF channel axis
    first); colour values carry no rescale."""
    out = np.empty((3, len(plan.files), *plan.shape[1:]), dtype=np.uint8)
    decoded: dict[str, np.ndarray] = {}
    for k, rec in enumerate(plan.files):
        if rec["local"] not in decoded:
            decoded[rec["local"]] = _read_pixels(rec["local"], rec["path"])[0]
        pixels = decoded[rec["local"]]
        arr = pixels[rec["frame"]] if pixels.ndim == 4 else pixels
        if arr.shape != (*plan.shape[1:], 3):
            raise SeriesAssemblyError(rec["path"], f"colour pixel array shape {arr.shape} differs from "
                                                   f"Rows x Columns x 3 {(*plan.shape[1:], 3)}")
        out[:, k] = np.moveaxis(arr, -1, 0)
    return out


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
    if plan.channels:
        return _load_colour(plan)
    raws: list[np.ndarray] = []
    scales: list[tuple[float, float]] = []
    decoded: dict[str, np.ndarray] = {}  # multi-frame files, decoded once for all their frames
    for rec in plan.files:
        if direct and rec.get("pixel_offset") is not None:  # plain pixels (a frame's too): by offset
            arr = _read_direct(rec)
            slope = 1.0 if rec["rescale_slope"] is None else rec["rescale_slope"]
            intercept = 0.0 if rec["rescale_intercept"] is None else rec["rescale_intercept"]
        elif rec.get("frame") is not None:
            if rec["local"] not in decoded:
                decoded[rec["local"]] = _read_pixels(rec["local"], rec["path"])[0]
                if rec.get("mosaic"):
                    decoded[rec["local"]] = unmosaic(decoded[rec["local"]], *rec["mosaic"], rec["mosaic_frames"])
            frames = decoded[rec["local"]]
            arr = frames[rec["frame"]] if frames.ndim == 3 else frames
            slope = 1.0 if rec["rescale_slope"] is None else rec["rescale_slope"]
            intercept = 0.0 if rec["rescale_intercept"] is None else rec["rescale_intercept"]
        else:
            arr, slope, intercept = _read_pixels(rec["local"], rec["path"])
        if rec.get("scale_slope") and rec.get("manufacturer") == "Philips":
            slope, intercept = philips_precise(slope, intercept, rec["scale_slope"])
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
                wider = np.empty(out.shape, np.float64)
                wider[:k] = out[:k]  # the rest is not written yet
                out, dtype = wider, np.dtype(np.float64)
            out[k] = exact
    if plan.timepoints > 1:  # (t * z, y, x) -> (t, z, y, x)
        return out.reshape(plan.timepoints, plan.shape[0], *plan.shape[1:])
    if plan.offsets is not None:
        return resample_slices(out, plan.offsets, plan.shape[0])
    return out
