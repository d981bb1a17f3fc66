"""Header scan: one DICOM file's header (no pixel data) becomes a flat, de-identified record
holding technical values and keyed pseudonyms only. The fast reader
(:mod:`voxelflow.io.dicom.fast_header`) reads plain files; pydicom reads the rest."""

from __future__ import annotations

import json
import os
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from voxelflow.deid import pseudonym
from voxelflow.errors import CorruptFileError, NotAnImageError
from voxelflow.io.dicom.fast_header import convert_value, read_header
from voxelflow.io.dicom.frames import frame_info, mosaic_info, siemens_csa_diffusion
from voxelflow.io.dicom.values import float_list, integer, number, seconds, technical_attributes
from voxelflow.io.dicom.vendor import PRIVATE_NAMES, PRIVATE_TAGS, component, diffusion, vendor

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


def looks_like_dicom(head: bytes) -> bool:
    """True for a Part 10 file (``DICM`` at 128) or a bare dataset starting with a group
    0002/0008 tag (some old exports omit the preamble)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


class _PydicomHeader:
    """A file parsed by pydicom, seen through the interface of
    :class:`~voxelflow.io.dicom.fast_header.FastHeader`."""

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
        if keyword in PRIVATE_NAMES:
            return self._private(keyword, default)
        return self.dataset.get(keyword, default)

    def _private(self, name: str, default: Any) -> Any:
        """A vendor's private value as the fast reader reads it: from the raw bytes with the
        VR voxelflow knows for it when pydicom does not know the tag (implicit VR: ``UN``)."""
        elem = self.dataset.get(PRIVATE_NAMES[name])
        if elem is None:
            return default
        value = elem.value
        if elem.VR in ("UN", "OB") or isinstance(value, (bytes, bytearray)):
            try:
                value = convert_value(name, PRIVATE_TAGS[PRIVATE_NAMES[name]][1], bytes(value or b""))
            except Exception:  # noqa: BLE001 - an unreadable private value is no value
                return default
        elif isinstance(value, (list, MultiValue)):
            value = [str(v) for v in value]
        return default if value is None or value == "" else value

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
        fast: try :mod:`voxelflow.io.dicom.fast_header` before pydicom (``False``: pydicom only;
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
    rows, cols = integer(ds, "Rows", path), integer(ds, "Columns", path)
    if not rows or not cols:
        raise CorruptFileError(path, f"Rows/Columns missing or zero (Rows={rows}, Columns={cols})")

    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    samples = integer(ds, "SamplesPerPixel", path) or 1
    bits = integer(ds, "BitsAllocated", path) or 0
    frames = integer(ds, "NumberOfFrames", path) or 1
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
    bits_stored = integer(ds, "BitsStored") or bits
    high_bit = integer(ds, "HighBit")
    direct = (pixel_kw == "PixelData" and syntax in DIRECT_SYNTAXES and tell is not None
              and bits in (8, 16, 32) and samples == 1
              and length not in (None, 0xFFFFFFFF) and length >= rows * cols * frames * bits // 8
              and (high_bit is None or high_bit == bits_stored - 1))
    image_type = ds.get("ImageType")
    image_type = "\\".join(str(v) for v in image_type) if isinstance(image_type, (list, MultiValue)) \
        else str(image_type or "")
    mosaic = None
    if "MOSAIC" in image_type.upper().split("\\"):
        if getattr(ds, "dataset", None) is None:  # the fast reader skips private tags: the CSA header
            ds = _PydicomHeader(pydicom.dcmread(local, defer_size=256, force=True))
        mosaic = mosaic_info(ds.dataset, path, rows, cols)
        direct = False
    maker = vendor(str(ds.get("Manufacturer", "") or ""))
    b_value, gradient, isotropic = diffusion(maker, ds.get, ds.get, float_list(ds, "ImageOrientationPatient", 6))
    if mosaic is not None and b_value is None and maker == "Siemens":
        b_value, gradient, isotropic = siemens_csa_diffusion(ds.dataset)
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
        "manufacturer": maker,
        "sop_class": pydicom.uid.UID(sop_class).name if sop_class else "",
        "transfer_syntax": syntax,
        "rows": rows,
        "cols": cols,
        "samples": samples,
        "bits_allocated": bits,
        "bits_stored": bits_stored,
        "pixel_offset": tell if direct else None,
        "pixel_representation": integer(ds, "PixelRepresentation") or 0,
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "frames": frames,
        "orientation": float_list(ds, "ImageOrientationPatient", 6, path),
        "position": float_list(ds, "ImagePositionPatient", 3, path),
        "pixel_spacing": float_list(ds, "PixelSpacing", 2, path),
        "slice_thickness": number(ds, "SliceThickness"),
        "spacing_between_slices": number(ds, "SpacingBetweenSlices"),
        "instance_number": integer(ds, "InstanceNumber"),
        "acquisition_number": integer(ds, "AcquisitionNumber"),
        "echo_number": integer(ds, "EchoNumbers"),
        "echo_time": number(ds, "EchoTime"),
        "temporal_position": integer(ds, "TemporalPositionIdentifier"),
        "acquisition_time": seconds(ds.get("AcquisitionTime") or ds.get("ContentTime")),
        "trigger_time": number(ds, "TriggerTime"),
        "repetition_time": number(ds, "RepetitionTime"),
        "image_type": image_type,
        "component": component(image_type, maker, ds.get),
        "rescale_slope": number(ds, "RescaleSlope", path),
        "rescale_intercept": number(ds, "RescaleIntercept", path),
        "scale_slope": number(ds, "Philips_ScaleSlope", path) if maker == "Philips" else None,
        "b_value": b_value,
        "gradient": gradient,
        "isotropic": isotropic,
        "attributes": json.dumps(technical_attributes(ds), sort_keys=True),
        "frame_info": json.dumps(frame_info(ds.dataset, frames))
        if frames > 1 and "PerFrameFunctionalGroupsSequence" in ds else None,
    } | (mosaic or {})


