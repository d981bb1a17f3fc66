"""Realistic synthetic CT series written as real DICOM files with pydicom.

Used by the demo, the tests and the benchmarks wherever no real file covers a case
(oblique stacks, feet-first, descending order, several series in one folder, big series).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_phantom(shape: tuple[int, int, int], spacing: Sequence[float] = (2.5, 0.8, 0.8),
               seed: int = 0, noise_hu: float = 10.0) -> np.ndarray:
    """A torso-like CT volume in HU, ``(slices, rows, cols)`` int16: air, body, lungs,
    spine, a contrast-enhanced organ and Gaussian noise (``noise_hu``)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)),
                          indexing="ij")
    cz, cy, cx = (n * s / 2 for n, s in zip(shape, spacing))
    vol = np.full(shape, -1000.0, dtype=np.float32)
    body = ((x - cx) / (0.42 * nx * spacing[2])) ** 2 + ((y - cy) / (0.32 * ny * spacing[1])) ** 2 <= 1
    vol[body] = 40.0
    for side in (-1, 1):
        lung = ((x - cx - side * 0.18 * nx * spacing[2]) / (0.13 * nx * spacing[2])) ** 2 + \
               ((y - cy + 0.03 * ny * spacing[1]) / (0.2 * ny * spacing[1])) ** 2 <= 1
        vol[lung & (z < 0.6 * nz * spacing[0])] = -820.0
    spine = ((x - cx) ** 2 + (y - cy - 0.22 * ny * spacing[1]) ** 2) <= (0.05 * nx * spacing[2]) ** 2
    vol[spine] = 700.0
    organ = ((x - cx + 0.15 * nx * spacing[2]) ** 2 + (y - cy) ** 2 + (z - 0.75 * nz * spacing[0]) ** 2) \
        <= (0.12 * nx * spacing[2]) ** 2
    vol[organ] = 120.0
    if noise_hu:
        vol += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


def oblique_orientation(about_z_deg: float, about_x_deg: float = 0.0) -> tuple[float, ...]:
    """ImageOrientationPatient of an axial plane rotated about z, then about x (degrees)."""
    a, b = np.radians(about_z_deg), np.radians(about_x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rx @ rz
    return tuple(float(v) for v in np.concatenate([r[:, 0], r[:, 1]]))


@dataclass
class SeriesSpec:
    """Geometry and identity of a generated series."""

    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0)  # row cosine, column cosine (LPS)
    origin: Sequence[float] = (-150.0, -150.0, 0.0)  # position of slice 0 (LPS mm)
    pixel_spacing: Sequence[float] = (0.8, 0.8)  # (between rows, between columns)
    slice_spacing: float = 2.5
    patient_position: str = "HFS"
    descending: bool = False  # write instance numbers from the last slice
    patient_name: str = "DEMO^PATIENT"
    patient_id: str = "DEMO-0001"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_uid: str = field(default_factory=generate_uid)
    series_number: int = 1
    extra: dict = field(default_factory=dict)  # more attributes, set on every file
    transfer_syntax: str = ExplicitVRLittleEndian  # compressed syntaxes are encoded losslessly
    uid_seed: str | None = None  # SOP instance UIDs derived from this (deterministic) if set


def write_ct_series(volume_hu: np.ndarray, outdir: str | os.PathLike, spec: SeriesSpec,
                    prefix: str = "IM") -> list[Path]:
    """Write ``volume_hu`` ``(slices, rows, cols)`` as one CT series, a file per slice.

    Stored values are HU + 1024 (unsigned, RescaleIntercept -1024) as most scanners write.
    Slice k lies at ``origin + k * slice_spacing * normal``.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(spec.orientation[:3], float), np.asarray(spec.orientation[3:], float)
    normal = np.cross(row, col)
    nz, ny, nx = volume_hu.shape
    paths = []
    order = range(nz - 1, -1, -1) if spec.descending else range(nz)
    for number, k in enumerate(order, start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = (generate_uid(entropy_srcs=[spec.uid_seed, str(k)])
                                           if spec.uid_seed else generate_uid())
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"{prefix}{number:05d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = spec.study_uid
        ds.SeriesInstanceUID = spec.series_uid
        ds.FrameOfReferenceUID = spec.frame_uid
        ds.StudyDate = ds.SeriesDate = "20250101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.ContentDate, ds.ContentTime = "20250101", "120500"
        ds.StudyID = "1"
        ds.AcquisitionNumber = 1
        ds.AccessionNumber = "ACC0001"
        ds.InstitutionName = "Demo Hospital"
        ds.ReferringPhysicianName = "REFERRER^DEMO"
        ds.Modality = "CT"
        ds.Manufacturer = "voxelflow-phantom"
        ds.BodyPartExamined = "CHEST"
        ds.KVP = 120
        ds.SeriesNumber = spec.series_number
        ds.InstanceNumber = number
        ds.PatientPosition = spec.patient_position
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in spec.orientation]
        pos = np.asarray(spec.origin, float) + k * spec.slice_spacing * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.SliceLocation = f"{float(pos @ normal):.4f}"
        ds.PixelSpacing = [f"{v:g}" for v in spec.pixel_spacing]
        ds.SliceThickness = f"{spec.slice_spacing:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        for key, value in spec.extra.items():
            setattr(ds, key, value)
        ds.PixelData = (volume_hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        if spec.transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(spec.transfer_syntax)  # lossless encoders: RLE, JPEG-LS, JPEG 2000
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

