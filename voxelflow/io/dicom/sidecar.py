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
from private data, with the helpers of :mod:`.timing` (one per source dcm2niix uses;
:func:`voxelflow.io.dicom.stack.stack_sidecar` calls them for a planned stack):

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

from collections.abc import Mapping, Sequence
from typing import Any

import pydicom

from voxelflow.io.dicom.coerce import integer_or_none as _int, normalise as _normalise, num as _num
from voxelflow.io.dicom.coerce import present as _present, strings as _strings, text as _text
from voxelflow.io.dicom.timing import ge_reordering_polarity

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
        polarity = ge_reordering_polarity(a.get("RectilinearPhaseEncodeReordering"))
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


# --- slice timing and phase-encoding polarity, one helper per source -----------------------


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


