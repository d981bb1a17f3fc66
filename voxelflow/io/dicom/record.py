"""The scan record: what the header scan (:func:`~voxelflow.io.dicom.header.scan_dicom`) keeps
of one DICOM file, as a typed dict, and its Arrow schema derived from the same annotations so
the two cannot drift. Identifiers appear only as keyed pseudonyms; everything else is
technical. Geometry is in DICOM's patient frame (LPS, millimetres), as the file states it."""

from __future__ import annotations

import types
import typing
from typing import TypedDict

import pyarrow as pa


class ScanRecord(TypedDict, total=False):
    series: str  # pseudonyms (keyed, see voxelflow.deid)
    patient: str
    study: str
    instance: str
    modality: str
    manufacturer: str  # "GE", "Philips", "Siemens", "Canon", ... (vendor rules key on it), else as written
    sop_class: str  # its name, e.g. "Enhanced MR Image Storage"
    transfer_syntax: str
    rows: int
    cols: int
    samples: int
    bits_allocated: int
    bits_stored: int
    pixel_offset: int | None  # where plain little-endian pixels lie: read without parsing again
    pixel_representation: int
    photometric: str
    frames: int
    orientation: list[float] | None  # ImageOrientationPatient
    position: list[float] | None  # ImagePositionPatient
    pixel_spacing: list[float] | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    instance_number: int | None
    acquisition_number: int | None
    echo_number: int | None
    echo_time: float | None  # ms
    temporal_position: int | None
    acquisition_time: float | None  # seconds after midnight
    trigger_time: float | None  # ms
    repetition_time: float | None  # ms
    image_type: str  # ImageType values joined by backslashes
    # What the pixel values are, from ImageType, ComplexImageComponent or the vendor's private
    # image type: magnitude | phase | real | imaginary | fieldmap_hz ("" when not said).
    component: str
    rescale_slope: float | None
    rescale_intercept: float | None
    # Philips' private scale slope (2005,100E): dcm2niix's default "precise" floating-point
    # scaling divides by it (see voxelflow.io.dicom.vendor.philips_precise).
    scale_slope: float | None
    b_value: float | None  # s/mm², from the standard or the vendor's diffusion attributes
    gradient: list[float] | None  # diffusion direction in the patient frame (LPS), as written (~unit length)
    isotropic: bool | None  # a derived isotropic (trace) diffusion image
    attributes: str  # JSON: the allow-listed technical attributes (voxelflow.deid)
    frame_info: str | None  # JSON: per-frame geometry of enhanced multi-frame images and mosaics
    mosaic: list[int] | None  # Siemens mosaic: tiles per side, tile rows, tile cols


_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _arrow_type(annotation) -> pa.DataType:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _arrow_type(args[0])
    if typing.get_origin(annotation) is list:
        return pa.list_(_ARROW[args[0]])
    return _ARROW[annotation]


FIELDS: tuple[str, ...] = tuple(typing.get_type_hints(ScanRecord))
SCHEMA = pa.schema([(name, _arrow_type(tp)) for name, tp in typing.get_type_hints(ScanRecord).items()])
