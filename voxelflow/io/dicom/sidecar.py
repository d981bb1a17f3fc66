"""The BIDS JSON sidecar of an exported NIfTI, from the de-identified technical attributes of
the volume's first image.

Analysis tools (fMRIPrep, FSL topup, SPM slice timing) read acquisition parameters from the
sidecar beside a NIfTI, in the units and conventions dcm2niix writes: times in seconds,
``PhaseEncodingDirection`` relative to the image's voxel axes, ``SliceTiming`` in slice order.
:func:`bids_sidecar` writes the same values as dcm2niix (v1.0.20260724) for the fields both
write; ``tests/io/test_sidecar.py`` checks it field by field on the real GE, Philips and
Siemens series of the DICOM corpus and lists the few exceptions with their reasons (values
dcm2niix derives from private data or times of day, and one dcm2niix bug). The rules follow
dcm2niix's ``nii_SaveBIDSX`` (``console/nii_dicom_batch.cpp``) and its tag readers
(``console/nii_dicom.cpp``). Fields dcm2niix takes from private data only (Siemens'
BaseResolution, PartialFourier, BandwidthPerPixelPhaseEncode and the echo spacing and
readout time derived from it; Philips' scale slopes and water-fat shift) are left out.

De-identification is by construction: :func:`bids_sidecar` reads only the keywords of
:data:`SIDECAR_KEYWORDS` and ignores every other key it is given, so names, IDs, UIDs, dates,
times of day, institution, station, serial number and free-text descriptions cannot reach the
sidecar (dcm2niix writes several of them; this module does not).

Two inputs are not plain attributes of the first image, and the caller computes them, mostly
from private data, with the helpers here (one per source dcm2niix uses):

* ``slice_times``: Siemens mosaics, CSA ``MosaicRefAcqTimes`` (:func:`slice_times_from_csa`);
  Siemens XA enhanced, per-frame ``TimeAfterStart`` (0021,1104) (:func:`slice_times_from_frames`);
  GE, computed from the Protocol Data Block (0025,101B) (:func:`slice_times_ge`). dcm2niix
  writes no slice timing for Philips (the DICOM does not record it).
* ``phase_polarity``: Siemens CSA ``PhaseEncodingDirectionPositive``
  (:func:`phase_polarity_from_csa`); Siemens XA (0021,111C) (:func:`phase_polarity_from_frames`);
  GE (0018,9034) or the user-defined data block (0043,102A) (:func:`phase_polarity_ge`).
  Philips does not record it: the sidecar then says ``PhaseEncodingAxis``.

One concern: the sidecar's content. Writing the file next to the NIfTI is the export's job.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue

# The allow-list: standard DICOM keywords (pydicom names) the sidecar reads. Only technical
# acquisition parameters; PS3.15's Basic Application Level Confidentiality Profile keeps them
# all. Deliberately absent although dcm2niix writes them: SeriesDescription, ProtocolName,
# StudyDescription, ProcedureStepDescription and ImageComments (free text that operators fill
# with names, dates and study codes), InstitutionName/Address/Department, StationName,
# DeviceSerialNumber (they locate the scanner and so the patient), AcquisitionTime/DateTime
# (times of day), the UIDs and SeriesNumber/AcquisitionNumber (identifiers of the exam).
SIDECAR_KEYWORDS: tuple[str, ...] = (
    # scanner
    "Modality", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "MagneticFieldStrength", "ImagingFrequency", "TransmitterFrequency",
    # patient set-up (no identity)
    "BodyPartExamined", "PatientPosition",
    # sequence
    "MRAcquisitionType", "ScanningSequence", "SequenceVariant", "ScanOptions", "SequenceName",
    "PulseSequenceName", "EchoPulseSequence", "ImageType", "ComplexImageComponent", "EchoNumbers",
    "EchoTime", "EffectiveEchoTime", "RepetitionTime", "InversionTime", "FlipAngle", "EchoTrainLength",
    "NumberOfAverages", "SAR", "MagnetizationTransfer", "Spoiling",
    # geometry of the exported image
    "Rows", "Columns", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient",
    # k-space and readout
    "AcquisitionMatrix", "InPlanePhaseEncodingDirection", "PercentPhaseFieldOfView",
    "PercentSampling", "NumberOfPhaseEncodingSteps", "MRAcquisitionPhaseEncodingStepsInPlane",
    "MRAcquisitionFrequencyEncodingSteps", "MRAcquisitionPhaseEncodingStepsOutOfPlane",
    "PartialFourier", "PartialFourierDirection", "ParallelReductionFactorInPlane",
    "ParallelReductionFactorOutOfPlane", "ParallelAcquisitionTechnique", "PixelBandwidth",
    "RectilinearPhaseEncodeReordering", "AcquisitionDuration", "NumberOfKSpaceTrajectories",
    # coil
    "ReceiveCoilName",
)

# dcm2niix names the vendor from the first two letters of Manufacturer (dcmStrManufacturer).
_VENDORS = {"SI": "Siemens", "CP": "Siemens", "GE": "GE", "PH": "Philips", "TO": "Toshiba",
            "CA": "Canon", "ME": "Mediso", "HI": "Hitachi", "UI": "UIH", "BR": "Bruker"}
_MODALITIES = ("CR", "CT", "MR", "PT", "US")  # the ones dcm2niix's sidecar names
# Image-type values that mark derived images (dcm2niix: RawImage false).
_DERIVED_TOKENS = ("ADC", "TRACEW", "TRACE", "FA")


def bids_sidecar(attributes: Mapping[str, Any], *, slice_times: Sequence[float] | None = None,
                 phase_polarity: int | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The BIDS sidecar of one exported volume, with dcm2niix's field names, units and rules.

    Args:
        attributes: keyword -> value of the volume's first image (top level), as voxelflow's
            header scan normalises them: numbers as ``float``, multi-valued attributes as
            ``list[str]`` of the stored strings, anything else as ``str``. Keys that are not in
            :data:`SIDECAR_KEYWORDS` are ignored.
        slice_times: acquisition time of each slice of one volume in seconds, from any common
            origin (e.g. time after the start of the scan), in the stored slice order: slice
            ``k`` of the exported image, which voxelflow sorts along the slice normal (the
            cross product of ImageOrientationPatient's row and column cosines). The sidecar's
            ``SliceTiming`` is these times less the earliest. See the module docstring for the
            helper that computes them per vendor. Ignored for 3-D acquisitions, as dcm2niix
            does.
        phase_polarity: 1 when phase encoding runs along the positive in-plane direction of
            InPlanePhaseEncodingDirection (increasing column index for ROW, increasing row
            index for COL), 0 when it runs the other way, None when unknown. With it,
            ``PhaseEncodingDirection`` is ``i``/``i-`` (ROW) or ``j``/``j-`` (COL) relative to
            the exported image's voxel axes: voxelflow's i is the DICOM column index, j the
            row index, neither flipped, so its ``j`` is dcm2niix's ``j-`` (dcm2niix flips the
            rows). Without it the sidecar says ``PhaseEncodingAxis``, as dcm2niix does. For GE,
            RectilinearPhaseEncodeReordering gives it when this is None.
        extra: values for this volume that override or add to ``attributes``, same keywords
            and form: the functional-group values of enhanced multi-frame files (see
            :func:`functional_group_attributes`; dcm2niix reads EchoTime from MREchoSequence,
            RepetitionTime, FlipAngle and EchoTrainLength from MRTimingAndRelatedParameters,
            PixelBandwidth and TransmitterFrequency from MRImagingModifier, the k-space
            parameters from MRFOVGeometry and MRModifier, ReceiveCoilName from
            MRReceiveCoil), ``Rows``/``Columns`` of the exported slice when it is not the
            stored one (a Siemens mosaic's tile), and values a vendor helper corrected (GE
            epiRT's RepetitionTime, :func:`repetition_time_ge`).

    Returns:
        Field name -> JSON value, in about dcm2niix's order; ``ConversionSoftware`` is
        "voxelflow". Fields without a value are left out, as dcm2niix leaves them out.
    """
    a = {k: v for k, v in attributes.items() if k in _ALLOWED and _present(v)}
    a.update({k: v for k, v in (extra or {}).items() if k in _ALLOWED and _present(v)})
    out: dict[str, Any] = {}

    modality = _text(a.get("Modality")).upper()
    if modality in _MODALITIES:
        out["Modality"] = modality
    _positive(out, "MagneticFieldStrength", _num(a.get("MagneticFieldStrength")))
    frequency = _num(a.get("ImagingFrequency")) or _num(a.get("TransmitterFrequency"))
    if frequency is not None and 0 < frequency < 9e6:  # UIH stores Hz, not MHz
        out["ImagingFrequency"] = frequency
    manufacturer = _VENDORS.get(_text(a.get("Manufacturer"))[:2].upper())
    if manufacturer:
        out["Manufacturer"] = manufacturer
    _string(out, "ManufacturersModelName", a.get("ManufacturerModelName"))
    _string(out, "BodyPart", a.get("BodyPartExamined"))  # dcm2niix's name for it
    _string(out, "PatientPosition", a.get("PatientPosition"))
    _string(out, "SoftwareVersions", a.get("SoftwareVersions"))
    acquisition_type = _text(a.get("MRAcquisitionType")).upper()
    is_3d = acquisition_type == "3D"
    if acquisition_type in ("2D", "3D"):
        out["MRAcquisitionType"] = acquisition_type
    for key in ("ScanningSequence", "SequenceVariant", "ScanOptions"):
        _string(out, key, a.get(key))
    # enhanced files name the sequence in PulseSequenceName (0018,9005) only
    _string(out, "SequenceName", a.get("SequenceName") or a.get("PulseSequenceName"))

    image_type = _strings(a.get("ImageType"))
    if image_type:
        out["ImageType"] = _image_type(image_type, _text(a.get("ComplexImageComponent")).upper(),
                                       manufacturer)
        if "DIS2D" in image_type or "DIS3D" in image_type:
            out["NonlinearGradientCorrection"] = True
        elif "ND" in image_type:
            out["NonlinearGradientCorrection"] = False
        if any("DERIVED" in t for t in image_type) or any(t in _DERIVED_TOKENS for t in image_type[1:-1]):
            out["RawImage"] = False

    _positive(out, "SliceThickness", _num(a.get("SliceThickness")))
    _positive(out, "SpacingBetweenSlices", _num(a.get("SpacingBetweenSlices")))
    _positive(out, "SAR", _num(a.get("SAR")))
    averages = _num(a.get("NumberOfAverages"))
    if averages is not None and averages > 1:
        out["NumberOfAverages"] = averages
    echo = _int(a.get("EchoNumbers"))
    if echo is not None and echo > 1:  # dcm2niix also writes 1 when it knows the series has several
        out["EchoNumber"] = echo
    echo_time = _num(a.get("EchoTime")) or _num(a.get("EffectiveEchoTime"))
    _positive(out, "EchoTime", _ms_to_s(echo_time))
    _positive(out, "RepetitionTime", _ms_to_s(_num(a.get("RepetitionTime"))))
    magnetization = _text(a.get("MagnetizationTransfer")).upper()
    if magnetization:
        out["MTState"] = magnetization.startswith("OFF")  # off-resonance MT pulse: on
    spoiling = _text(a.get("Spoiling")).upper()
    if spoiling in ("RF", "GRADIENT", "RF_AND_GRADIENT"):
        out["SpoilingState"] = True
        out["SpoilingType"] = {"RF_AND_GRADIENT": "COMBINED"}.get(spoiling, spoiling)
    elif spoiling == "NONE":
        out["SpoilingState"] = False
    elif not spoiling and "SP" in _strings(a.get("SequenceVariant")):
        out["SpoilingState"] = True  # Siemens V-series record spoiling only in SequenceVariant
    _positive(out, "InversionTime", _ms_to_s(_num(a.get("InversionTime"))))
    _positive(out, "FlipAngle", _num(a.get("FlipAngle")))

    _positive(out, "PercentPhaseFOV", _num(a.get("PercentPhaseFieldOfView")))
    _positive(out, "PercentSampling", _num(a.get("PercentSampling")))
    train = _int(a.get("EchoTrainLength"))
    if train is not None and train > 1:  # Siemens EPI stores 1 (its EPI factor is private)
        out["EchoTrainLength"] = train
    direction = _text(a.get("PartialFourierDirection")).upper()
    if direction in ("PHASE", "FREQUENCY", "SLICE_SELECT", "COMBINATION"):
        out["PartialFourierDirection"] = direction
    steps = (_int(a.get("MRAcquisitionPhaseEncodingStepsInPlane"))
             or _int(a.get("NumberOfPhaseEncodingSteps")))
    if steps and steps > 0:
        partial = (_text(a.get("PartialFourier")).upper().startswith("Y")
                   or "PFF" in _strings(a.get("ScanOptions")))
        if partial and manufacturer == "Philips":  # dcm2niix issue 377
            out["PartialFourierEnabled"] = "YES"
            out["PhaseEncodingStepsNoPartialFourier"] = steps
        else:
            out["PhaseEncodingSteps"] = steps
    for key, keyword in (("FrequencyEncodingSteps", "MRAcquisitionFrequencyEncodingSteps"),
                         ("PhaseEncodingStepsOutOfPlane", "MRAcquisitionPhaseEncodingStepsOutOfPlane")):
        value = _int(a.get(keyword))
        if value and value > 0:
            out[key] = value
    rc = _text(a.get("InPlanePhaseEncodingDirection")).upper()[:1]  # ROW, COL or COLUMN
    lines = _phase_encoding_lines(a.get("AcquisitionMatrix"))
    if lines and modality == "MR":
        out["AcquisitionMatrixPE"] = lines
    recon = _recon_matrix_pe(_int(a.get("Rows")), _int(a.get("Columns")), rc) or lines
    if recon and modality == "MR":
        out["ReconMatrixPE"] = recon
    if manufacturer != "Siemens":  # dcm2niix reads Siemens' acceleration from private tags only
        for key in ("ParallelReductionFactorInPlane", "ParallelReductionFactorOutOfPlane"):
            value = _num(a.get(key))
            if value is not None and value >= 1:
                out[key] = value
    _string(out, "ParallelAcquisitionTechnique", a.get("ParallelAcquisitionTechnique"))
    _positive(out, "PixelBandwidth", _num(a.get("PixelBandwidth")))
    _positive(out, "AcquisitionDuration", _num(a.get("AcquisitionDuration")))
    trajectories = _int(a.get("NumberOfKSpaceTrajectories"))
    if trajectories and trajectories > 0:
        out["NumberOfKSpaceTrajectories"] = trajectories

    # Phase encoding: dcm2niix skips 3-D acquisitions (SPACE/TSE, its issues 371 and 849)
    # unless they are echo trains of a gradient echo.
    spin_echo = ("SE" in _strings(a.get("ScanningSequence"))
                 or _text(a.get("EchoPulseSequence")).upper() == "SPIN")
    skip_phase = is_3d and not (train is not None and train > 1 and not spin_echo)
    polarity = phase_polarity
    if polarity is None and manufacturer == "GE":
        polarity = _ge_reordering_polarity(a.get("RectilinearPhaseEncodeReordering"))
    if manufacturer == "GE" and polarity in (0, 1):
        out["PhaseEncodingPolarityGE"] = "Unflipped" if polarity == 1 else "Flipped"
    if rc in ("R", "C") and not skip_phase:
        axis = "i" if rc == "R" else "j"
        if polarity in (0, 1):
            out["PhaseEncodingDirection"] = axis if polarity == 1 else axis + "-"
        else:
            out["PhaseEncodingAxis"] = axis

    if slice_times is not None and len(slice_times) > 0 and not is_3d and modality not in ("CT", "PT"):
        start = min(float(t) for t in slice_times)
        timing = [round(float(t) - start, 6) for t in slice_times]  # µs: beyond any scanner's clock
        # slices excited together (simultaneous multi-slice) share the earliest time
        together = sum(1 for t in timing if abs(t) < 1e-6)
        if 1 < together < len(timing):
            out["MultibandAccelerationFactor"] = together
        out["SliceTiming"] = timing

    orientation = [_num(v) for v in _strings(a.get("ImageOrientationPatient"))]
    if len(orientation) == 6 and None not in orientation and any(orientation):
        out["ImageOrientationPatientDICOM"] = orientation
    if rc in ("R", "C"):
        out["InPlanePhaseEncodingDirectionDICOM"] = "ROW" if rc == "R" else "COL"
    # dcm2niix puts the standard ReceiveCoilName in CoilString (Siemens' 0051,100F goes there
    # too); BIDS defines ReceiveCoilName as this very tag, so it gets both.
    _string(out, "ReceiveCoilName", a.get("ReceiveCoilName"))
    _string(out, "CoilString", a.get("ReceiveCoilName"))
    out["ConversionSoftware"] = "voxelflow"
    version = _version()
    if version:
        out["ConversionSoftwareVersion"] = version
    return out


_ALLOWED = frozenset(SIDECAR_KEYWORDS)


# --- inputs for enhanced multi-frame files -------------------------------------------------

def functional_group_attributes(ds: pydicom.Dataset, frame: int = 0) -> dict[str, Any]:
    """The :data:`SIDECAR_KEYWORDS` an enhanced multi-frame file keeps in its functional groups.

    Enhanced MR stores most acquisition parameters per frame or shared, one level down:
    ``SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0].RepetitionTime``
    and the like. dcm2niix reads those tags wherever they are; pass the result to
    :func:`bids_sidecar` as ``extra``.

    Args:
        ds: the enhanced image (pydicom).
        frame: index of the volume's first frame in PerFrameFunctionalGroupsSequence; its
            values win over the shared ones.

    Returns:
        Keyword -> value in the normalised form of :func:`bids_sidecar`'s ``attributes``.
    """
    out: dict[str, Any] = {}
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and 0 <= frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:
        for element in group:
            # standard functional-group macros only: a private one (Philips' 2005,140F) holds
            # a whole classic header of other values
            if element.VR != "SQ" or not element.value or element.tag.group % 2:
                continue
            for keyword in SIDECAR_KEYWORDS:
                value = element.value[0].get(keyword)
                if _present(value):
                    out[keyword] = _normalise(value)
    return out


def _normalise(value: Any) -> Any:
    """A pydicom value in the header scan's form (see values.technical_attributes)."""
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    if isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.IS, float, int)):
        return float(value)
    return str(value)


# --- slice timing and phase-encoding polarity, one helper per source -----------------------

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
    polarity = _ge_reordering_polarity(_normalise(ds.get("RectilinearPhaseEncodeReordering", "")))
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


# --- rules and readers ---------------------------------------------------------------------

def _image_type(values: list[str], complex_component: str, manufacturer: str | None) -> list[str]:
    """ImageType as dcm2niix writes it: the stored values split at backslashes and
    underscores (Philips' ``M_FFE`` becomes ``M``, ``FFE``), then what the image is
    (MAGNITUDE, PHASE, REAL, IMAGINARY) when no value says so already.

    dcm2niix reads the kind from the values it joined with underscores (``_M_``, ``_P_``,
    ``_REAL_``...: so not from the first or last value, except PHASE anywhere) and from
    ComplexImageComponent. It names no magnitude in a MIXED image (Philips' enhanced files
    holding magnitude and phase frames).
    """
    joined = "_".join(values)
    has = {
        "PHASE": "_P_" in joined or "PHASE" in joined or complex_component == "PHASE",
        "REAL": "_R_" in joined or "_REAL_" in joined or complex_component == "REAL",
        "IMAGINARY": "_I_" in joined or "_IMAGINARY_" in joined or complex_component == "IMAGINARY",
        "MAGNITUDE": "_M_" in joined or "_MAGNITUDE_" in joined or complex_component == "MAGNITUDE",
    }
    out = [token for token in joined.split("_") if token]
    for token in ("PHASE", "REAL", "IMAGINARY"):
        if has[token] and (manufacturer == "GE" or f"_{token}_" not in joined):
            out.append(token)
    if (has["MAGNITUDE"] and not (has["PHASE"] or has["REAL"] or has["IMAGINARY"]) and "MIXED" not in out
            and (manufacturer == "GE" or "_MAGNITUDE_" not in joined)):
        out.append("MAGNITUDE")
    return out


def complex_component_ge(ds: pydicom.Dataset) -> str | None:
    """What a GE image's values are, from GE's private image type (0043,102F: 0 magnitude,
    1 phase, 2 real, 3 imaginary), as a ComplexImageComponent value for ``extra``."""
    value = _int(_private(ds, 0x0043, "GEMS_PARM_01", 0x2F))
    return {0: "MAGNITUDE", 1: "PHASE", 2: "REAL", 3: "IMAGINARY"}.get(value) if value is not None else None


def _phase_encoding_lines(matrix: Any) -> int | None:
    """Acquired phase-encoding lines from AcquisitionMatrix (frequency rows, frequency
    columns, phase rows, phase columns): the phase value that is not 0, rows first."""
    values = [_int(v) for v in _strings(matrix)]
    if len(values) != 4 or None in values:
        return None
    return values[2] or values[3] or None


def _recon_matrix_pe(rows: int | None, columns: int | None, rc: str) -> int | None:
    """Reconstructed lines along the phase-encoding axis: rows for COL, columns for ROW."""
    if not rows or not columns:
        return None
    if rows == columns or rc == "C":
        return rows
    return columns if rc == "R" else None


def _ge_reordering_polarity(value: Any) -> int | None:
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


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != []


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split("\\")]


def _text(value: Any) -> str:
    return "\\".join(_strings(value)) if value is not None else ""


def _num(value: Any) -> float | None:
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if value else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(round(number))


def _int_or(value: Any, default: int) -> int:
    number = _int(value)
    return default if number is None else number


def _ms_to_s(value: float | None) -> float | None:
    return None if value is None else value / 1000.0


def _positive(out: dict[str, Any], key: str, value: float | None) -> None:
    if value is not None and value > 0:  # dcm2niix's json_Float: absent, zero or negative is unset
        out[key] = value


def _string(out: dict[str, Any], key: str, value: Any) -> None:
    text = _text(value)
    if text:
        out[key] = text


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("voxelflow")
    except Exception:  # noqa: BLE001 - not installed: leave the version out
        return None


def stack_sidecar(files: Sequence[Mapping[str, Any]], timepoints: int = 1) -> dict[str, Any]:
    """The sidecar of one planned stack (its scan records in slice order, time-major), read
    from its files while ingest still has them (``local``): the allow-listed attributes of
    its first image, the functional groups of its frame in an enhanced file, and the vendor's
    slice times and phase-encoding polarity (one helper per source, as above).

    Raises:
        OSError: a file cannot be read (ingest treats it as transient).
    """
    first = files[0]
    ds = _header(first["local"])
    attributes = {k: _normalise(ds.get(k)) for k in SIDECAR_KEYWORDS if ds.get(k) not in (None, "")}
    extra: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    enhanced = "PerFrameFunctionalGroupsSequence" in ds and not first.get("mosaic")
    if enhanced:
        extra.update(functional_group_attributes(ds, int(first.get("frame") or 0)))
    per = len(files) // max(timepoints, 1)
    # one file per volume of the first two time points (a mosaic or an enhanced file each)
    volumes = [files[k * per]["local"] for k in range(min(timepoints, 2))]
    maker = first.get("manufacturer") or ""
    if maker == "Siemens":
        if first.get("mosaic"):
            kwargs["slice_times"] = slice_times_from_csa([ds] + [_header(p) for p in volumes[1:]
                                                                  if p != first["local"]])
            kwargs["phase_polarity"] = phase_polarity_from_csa(ds)
            extra.update(Rows=float(first["rows"]), Columns=float(first["cols"]))  # the tiles
        elif enhanced:
            others = [_header(p) for p in volumes[1:] if p != first["local"]]
            kwargs["slice_times"] = slice_times_from_frames([ds] + others)
            kwargs["phase_polarity"] = phase_polarity_from_frames(ds)
        else:
            kwargs["phase_polarity"] = phase_polarity_from_csa(ds)
    elif maker == "GE":
        if timepoints > 1:  # dcm2niix times GE slices of 4-D series only
            # slice_times_ge reads the protocol block of the first image in instance order; the
            # others need only their instance number and position, which the scan has
            volume = files[:per]
            lead = min(range(len(volume)), key=lambda i: volume[i].get("instance_number") or 0)
            kwargs["slice_times"] = slice_times_ge([_header(r["local"]) if i == lead else _Slice(r)
                                                    for i, r in enumerate(volume)])
        kwargs["phase_polarity"] = phase_polarity_ge(ds)
        extra["RepetitionTime"] = repetition_time_ge(ds)
        extra["ComplexImageComponent"] = complex_component_ge(ds)
    return bids_sidecar(attributes, extra={k: v for k, v in extra.items() if v is not None}, **kwargs)


class _Slice:
    """One image of a volume as :func:`slice_times_ge` reads it, from its scan record."""

    def __init__(self, rec: Mapping[str, Any]):
        self.InstanceNumber = rec.get("instance_number")
        self.ImagePositionPatient = rec["position"]

    def get(self, keyword: str, default: Any = None) -> Any:
        return getattr(self, keyword, default)


def _header(path: str) -> pydicom.Dataset:
    """A file's header, parsed once for all the volumes it holds (the kinds of an enhanced
    file: parsing its per-frame groups is most of a sidecar's cost). Keyed by size and time
    of change too, so a file changed between two runs in one process is parsed again."""
    st = os.stat(path)
    return _parsed(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parsed(path: str, size: int, mtime_ns: int) -> pydicom.Dataset:
    return pydicom.dcmread(path, force=True, stop_before_pixels=True)
