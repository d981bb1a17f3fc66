"""NIfTI-1 and NIfTI-2 (``.nii``, ``.nii.gz``) reading, lossless, with nibabel's affine."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from voxelflow.errors import CorruptFileError, UnsupportedDataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def looks_like_nifti(head: bytes, name: str) -> bool:
    """NIfTI by magic (``n+1``/``ni1``/``n+2``/``ni2``) or, for gzip, by name."""
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):
        return True
    if len(head) >= 8 and head[4:7] in (b"n+2", b"ni2"):
        return True
    return head[:2] == b"\x1f\x8b" and name.lower().endswith(".nii.gz")


@dataclass
class NiftiVolume:
    data: np.ndarray  # NIfTI order: (i, j, k[, t])
    affine: np.ndarray
    time_step: float | None  # pixdim[4] for 4-D images, in seconds
    warnings: list[str]


def _lossless(img: nib.Nifti1Image, path: str) -> np.ndarray:
    """The image's values with scl_slope/scl_inter applied, in a dtype that keeps them exactly."""
    raw = np.asanyarray(img.dataobj.get_unscaled())
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if raw.dtype.kind not in "iuf" or raw.dtype.fields:
        raise UnsupportedDataError(path, f"NIfTI data type {raw.dtype} (RGB/complex) is not a scalar volume")
    if slope == 1 and inter == 0:
        return raw.astype(raw.dtype.newbyteorder("="), copy=False)
    exact = raw.astype(np.float64) * slope + inter
    if raw.dtype.kind in "iu" and float(slope).is_integer() and float(inter).is_integer():
        lo, hi = exact.min(), exact.max()
        for dt in (np.int16, np.uint16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return exact.astype(dt)
        return exact.astype(np.int64)
    as32 = exact.astype(np.float32)
    return as32 if np.array_equal(as32, exact) else exact


def read_nifti(local: str, path: str) -> NiftiVolume:
    """Read a 3-D or 4-D NIfTI image.

    Raises:
        CorruptFileError: unreadable, truncated or corrupt (gzip) file.
        UnsupportedDataError: more than 4 dimensions, or non-scalar voxels.
    """
    try:
        img = nib.load(local)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CorruptFileError(path, f"not a NIfTI image (nibabel read {type(img).__name__})")
        data = _lossless(img, path)
    except (CorruptFileError, UnsupportedDataError):
        raise
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, gzip.BadGzipFile,
            zlib.error) as exc:
        raise CorruptFileError(path, f"NIfTI cannot be read ({type(exc).__name__}: {exc})") from None
    warnings: list[str] = []
    # Trailing singleton dimensions (e.g. a 3-D image stored as 4-D with nt=1) carry nothing.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., np.newaxis]
    if data.ndim > 4:
        raise UnsupportedDataError(path, f"{data.ndim}-D NIfTI (shape {data.shape}); only 3-D and 4-D are converted")
    hdr = img.header
    sform_code, qform_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    if sform_code == 0 and qform_code == 0:
        warnings.append("NIfTI has neither sform nor qform: affine taken from pixdim only (no world orientation)")
    time_step = None
    if data.ndim == 4:
        zooms = hdr.get_zooms()
        time_step = float(zooms[3]) if len(zooms) > 3 else None
        units = hdr.get_xyzt_units()[1]
        if time_step is not None and units == "msec":
            time_step /= 1000.0
        elif time_step is not None and units == "usec":
            time_step /= 1e6
    return NiftiVolume(data=data, affine=np.asarray(img.affine, dtype=np.float64),
                       time_step=time_step, warnings=warnings)
