"""The BIDS sidecar (voxelflow.io.dicom.sidecar) against dcm2niix's, field by field, on every
reference of the real-scanner DICOM corpus (../shared/dicom-corpus: GE, Philips and Siemens,
mosaics, enhanced multi-frame, classic single-frame); identifiers never reach it; the slice
timing and phase-encoding rules on small inputs made by hand."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from voxelflow.io.dicom import coerce, sidecar, timing
from voxelflow.io.dicom.sidecar import SIDECAR_KEYWORDS, bids_sidecar

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "dicom-corpus"
needs_corpus = pytest.mark.skipif(not (CORPUS / "MANIFEST.tsv").is_file(),
                                  reason=f"the real-scanner DICOM corpus is not at {CORPUS}")

# Fields both write that are not compared: which converter wrote the file.
NOT_COMPARED = {"ConversionSoftware", "ConversionSoftwareVersion"}

# (reference pattern, field) -> why voxelflow's value differs from dcm2niix's: values
# dcm2niix derives from data the sidecar does not read (private tags, times of day), and one
# dcm2niix bug. Patterns are fnmatch patterns of reference names.
KNOWN: dict[tuple[str, str], str] = {
    ("1903_WIP_SOURCE_-_3DpCASL_*", "RepetitionTime"):
        "dcm2niix replaces RepetitionTime (0018,0080: 4.25 s) with the interval between volumes "
        "estimated from their AcquisitionTime (51 s), a time of day the sidecar never reads",
    ("190[13]_WIP_*_cl", "EchoTrainLength"):
        "for classic Philips DICOM dcm2niix reports the private EPI factor (2001,1013: 7), not "
        "EchoTrainLength (0018,0091: 112); for the enhanced export of the same scan it reports 112",
    ("2001_WIP_fcMRI_Field_Mapping_enh_*", "SpoilingType"):
        "Spoiling (0018,9016) is RF; dcm2niix tests strstr(..., \"RF\") twice where it means RF "
        "and GRADIENT, so any RF spoiling comes out COMBINED",
    ("Philips_WIP_B0_NS_801_e2_fieldmaphz", "ImageType"):
        "dcm2niix tells a Philips B0 map in Hz by the ImageType 'B0 MAP' inside the private "
        "per-frame sequence (2005,140F) and appends FIELDMAPHZ; the standard frame says REAL",
}


def _known(name: str, field: str) -> str | None:
    return next((why for (pattern, f), why in KNOWN.items() if f == field and fnmatch(name, pattern)), None)


# --- the corpus --------------------------------------------------------------------------

def _read(path: Path) -> pydicom.Dataset:
    data = path.read_bytes()
    if path.name.endswith(".gz"):  # dcm_qa_philips_enh keeps its DICOM gzipped
        data = gzip.decompress(data)
    return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)


def _images(repo: str, folder: str) -> list[tuple[Path, pydicom.Dataset]]:
    """The image objects of one MANIFEST series (not notes, stray NIfTI or Raw Data)."""
    base = CORPUS / repo
    paths = sorted(base.glob(folder)) if "*" in folder else (
        [base / folder] if (base / folder).is_file() else sorted((base / folder).rglob("*")))
    out = []
    for path in paths:
        if not path.is_file() or path.suffix in (".nii", ".txt", ".pdf", ".xlsx", ".md"):
            continue
        ds = _read(path)
        if "Rows" in ds and not str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.66"):
            out.append((path, ds))  # an image (Raw Data Storage objects carry none)
    return out


def _references() -> list[tuple[str, str, str]]:
    with open(CORPUS / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [(row["repo"], row["folder"], name) for row in rows
            for name in re.findall(r"Ref/(\S+)\.nii\.gz", row["references"])]


def _attributes(ds: pydicom.Dataset) -> dict[str, Any]:
    """The normalised top-level attributes the header scan would store for SIDECAR_KEYWORDS."""
    return {k: coerce.normalise(ds.get(k)) for k in SIDECAR_KEYWORDS if ds.get(k) not in (None, "")}


def _component(ds: pydicom.Dataset, frame: pydicom.Dataset | None = None) -> str:
    """magnitude / phase / real of an image (or of one enhanced frame)."""
    if frame is not None:
        try:
            value = frame.MRImageFrameTypeSequence[0].ComplexImageComponent
        except (AttributeError, IndexError):
            value = ds.get("ComplexImageComponent", "")
        return str(value).lower()
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "P" in image_type[2:] or any("PHASE" in v for v in image_type):
        return "phase"
    if "REAL" in image_type or "R" in image_type[2:]:
        return "real"
    return "magnitude"


def _frame_echo_time(frame: pydicom.Dataset) -> float | None:
    try:
        return float(frame.MREchoSequence[0].EffectiveEchoTime)
    except (AttributeError, IndexError, TypeError):
        return None


def _select(name: str, images: list[tuple[Path, pydicom.Dataset]]):
    """The images that make reference ``name`` (dcm2niix splits a series by echo and by
    magnitude/phase: ``_e2``, ``_ph``) and the index of the volume's first frame."""
    echo = int(m.group(1)) if (m := re.search(r"_e(\d+)", name)) else None
    want = "phase" if name.endswith("_ph") else ("real" if name.endswith("_real") else None)
    first = images[0][1]
    frames = first.get("PerFrameFunctionalGroupsSequence")
    if len(images) == 1 and frames and len(frames) > 1 and (echo or want or name.endswith("fieldmaphz")):
        # one enhanced file holding several outputs: pick the frame (a Philips B0 map's
        # field map in Hz is its REAL frames)
        want = "real" if name.endswith("fieldmaphz") else (want or "magnitude")
        mine = [i for i, f in enumerate(frames) if _component(first, f) == want]
        times = sorted({_frame_echo_time(frames[i]) for i in mine})
        for index in mine:
            if echo and len(times) > 1 and _frame_echo_time(frames[index]) != times[echo - 1]:
                continue
            return images, index
        raise AssertionError(f"no frame of {name}")
    # several files: one echo (EchoNumbers, or an enhanced file's echo time) and one kind
    keys = {id(ds): _echo_key(ds) for _, ds in images}
    echoes = sorted(set(keys.values()))
    kinds = {_component(ds) for _, ds in images}
    chosen = [(path, ds) for path, ds in images
              if not (echo and len(echoes) > 1 and keys[id(ds)] != echoes[echo - 1])
              and not (len(kinds) > 1 and _component(ds) != (want or "magnitude"))]
    chosen.sort(key=lambda pd: int(pd[1].get("InstanceNumber", 0) or 0))
    return chosen, 0


def _echo_key(ds: pydicom.Dataset) -> float:
    if ds.get("EchoNumbers") not in (None, ""):
        return float(ds.EchoNumbers)
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    return (_frame_echo_time(frames[0]) if frames else None) or 0.0


def _first_volume(images: list[tuple[Path, pydicom.Dataset]]) -> list[pydicom.Dataset]:
    """Classic single-frame images of the first volume: one per slice position."""
    seen, volume = set(), []
    for _, ds in images:
        key = tuple(round(float(v), 2) for v in ds.ImagePositionPatient)
        if key not in seen:
            seen.add(key)
            volume.append(ds)
    return volume


@lru_cache(maxsize=None)
def _inputs(repo: str, folder: str, name: str) -> dict[str, Any]:
    """bids_sidecar's arguments for one reference, built as the export would build them."""
    images, frame = _select(name, _images(repo, folder))
    path, ds = images[0]
    manufacturer = str(ds.get("Manufacturer", "")).upper()
    kwargs: dict[str, Any] = {"attributes": _attributes(ds)}
    extra: dict[str, Any] = {}
    if "PerFrameFunctionalGroupsSequence" in ds:
        extra.update(sidecar.functional_group_attributes(ds, frame))
    if manufacturer.startswith("SI"):
        if "MOSAIC" in [str(v).upper() for v in ds.get("ImageType", [])]:
            kwargs["slice_times"] = timing.slice_times_from_csa([d for _, d in images[:2]])
            kwargs["phase_polarity"] = timing.phase_polarity_from_csa(ds)
            n = int(timing._csa_floats(timing._csa_tags(ds), "NumberOfImagesInMosaic")[0])
            per_side = math.ceil(math.sqrt(n))
            extra.update(Rows=float(ds.Rows // per_side), Columns=float(ds.Columns // per_side))
        elif "PerFrameFunctionalGroupsSequence" in ds:
            kwargs["slice_times"] = timing.slice_times_from_frames([d for _, d in images[:2]])
            kwargs["phase_polarity"] = timing.phase_polarity_from_frames(ds)
        else:
            kwargs["phase_polarity"] = timing.phase_polarity_from_csa(ds)
    elif manufacturer.startswith("GE"):
        volume = _first_volume(images)
        if len(images) > len(volume):  # dcm2niix times GE slices of 4-D series only
            kwargs["slice_times"] = timing.slice_times_ge(volume)
        kwargs["phase_polarity"] = timing.phase_polarity_ge(ds)
        extra["RepetitionTime"] = timing.repetition_time_ge(ds)
        extra["ComplexImageComponent"] = timing.complex_component_ge(ds)
    kwargs["extra"] = extra
    return kwargs


def _orientation(kwargs: dict[str, Any]) -> list[float]:
    merged = {**kwargs["attributes"], **kwargs["extra"]}
    return [float(v) for v in merged["ImageOrientationPatient"]]


def _axes_of_reference(path: Path, orientation: list[float]) -> list[tuple[int, int]]:
    """For each voxel axis of a dcm2niix NIfTI: which voxelflow axis (0 along DICOM rows, 1
    along DICOM columns, 2 along their cross product) it runs along, and in which sense."""
    affine = nib.load(path).affine[:3, :3]
    affine = affine / np.linalg.norm(affine, axis=0)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    ras = np.diag([-1.0, -1.0, 1.0])  # DICOM LPS -> NIfTI RAS
    ours = [ras @ row, ras @ col, ras @ np.cross(row, col)]
    out = []
    for axis in range(3):
        dots = [float(np.dot(affine[:, axis], v)) for v in ours]
        best = int(np.argmax(np.abs(dots)))
        out.append((best, 1 if dots[best] > 0 else -1))
    return out


def _in_our_frame(field: str, value: Any, axes: list[tuple[int, int]]) -> Any:
    """A dcm2niix value that refers to its voxel axes, restated for voxelflow's: dcm2niix flips
    the rows (its j runs against DICOM's column cosine) and sometimes the slices."""
    if field in ("PhaseEncodingDirection", "PhaseEncodingAxis"):
        ours, sense = axes["ijk".index(value[0])]
        if field == "PhaseEncodingAxis":
            return "ijk"[ours]
        negative = value.endswith("-") != (sense < 0)
        return "ijk"[ours] + ("-" if negative else "")
    if field == "SliceTiming":
        return list(value) if axes[2][1] > 0 else list(value)[::-1]
    return value


def _same(mine: Any, ref: Any) -> bool:
    if isinstance(ref, bool) or isinstance(mine, bool):
        return isinstance(ref, bool) and isinstance(mine, bool) and mine == ref
    if isinstance(ref, (int, float)) and isinstance(mine, (int, float)):
        # dcm2niix prints single-precision values with %g (6 significant digits)
        return (math.isclose(mine, ref, rel_tol=1e-6, abs_tol=1e-9)
                or f"{mine:g}" == f"{ref:g}" or f"{np.float32(mine):g}" == f"{ref:g}")
    if isinstance(ref, list) and isinstance(mine, list):
        return len(ref) == len(mine) and all(_same(a, b) for a, b in zip(mine, ref))
    return mine == ref


# --- 1. every reference ------------------------------------------------------------------

def _compare_all() -> tuple[int, int, list[str], set[tuple[str, str]]]:
    """(matched, compared, unexplained mismatches, KNOWN keys used) over the whole corpus."""
    matched = compared = 0
    mismatches, used = [], set()
    for repo, folder, name in _references():
        ref = json.loads((CORPUS / repo / "Ref" / f"{name}.json").read_text())
        kwargs = _inputs(repo, folder, name)
        ours = bids_sidecar(**kwargs)
        axes = _axes_of_reference(CORPUS / repo / "Ref" / f"{name}.nii.gz", _orientation(kwargs))
        for field in sorted(set(ours) & set(ref) - NOT_COMPARED):
            compared += 1
            expected = _in_our_frame(field, ref[field], axes)
            if _same(ours[field], expected):
                matched += 1
            elif _known(name, field):
                used |= {key for key in KNOWN if key[1] == field and fnmatch(name, key[0])}
            else:
                mismatches.append(f"{repo}/{name}.{field}: voxelflow {ours[field]!r} dcm2niix {expected!r}")
    return matched, compared, mismatches, used


@needs_corpus
def test_sidecar_fields_equal_dcm2niix_on_the_corpus():
    matched, compared, mismatches, used = _compare_all()
    print(f"\nsidecar fields: {matched}/{compared} matched "
          f"({compared - matched - len(mismatches)} known differences, {len(mismatches)} unexplained)")
    assert compared > 1500  # every reference was read and compared
    assert not mismatches, "\n".join(mismatches)
    # a KNOWN entry nothing differs on any more is stale
    assert used == set(KNOWN), f"stale KNOWN entries: {sorted(set(KNOWN) - used)}"


# --- 2. identifiers never reach the sidecar ----------------------------------------------

IDENTIFIERS = {
    "PatientName": "DOE^JANE", "PatientID": "PID-4711", "PatientBirthDate": "19700101",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.2",
    "AcquisitionDateTime": "20240102030405.000000", "AcquisitionTime": "030405.000000",
    "StudyDate": "20240102", "StudyTime": "030000", "AccessionNumber": "ACC-0815",
    "InstitutionName": "Sample General Hospital", "InstitutionAddress": "1 Sample Road",
    "StationName": "MRC-STATION-9", "DeviceSerialNumber": "SERIAL-31337",
    "SeriesDescription": "jane doe follow-up", "ProtocolName": "protocol of jane",
    "StudyDescription": "study of jane", "ImageComments": "called jane on monday",
}


def test_identifiers_in_the_attributes_never_reach_the_sidecar():
    technical = {"Modality": "MR", "Manufacturer": "SIEMENS", "MagneticFieldStrength": 3.0,
                 "RepetitionTime": 2000.0, "EchoTime": 30.0, "InPlanePhaseEncodingDirection": "COL",
                 "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "MRAcquisitionType": "2D"}
    out = bids_sidecar({**technical, **IDENTIFIERS}, slice_times=[0.0, 0.5], phase_polarity=1,
                       extra=dict(IDENTIFIERS))
    text = json.dumps(out)
    assert out["RepetitionTime"] == 2.0  # the technical values did arrive
    for keyword, value in IDENTIFIERS.items():
        assert keyword not in out
        assert value not in text, keyword
    assert not {"InstitutionName", "SeriesDescription", "ProtocolName", "AcquisitionTime",
                "AcquisitionDateTime", "PatientName", "PatientID", "SeriesNumber"} & set(out)


@needs_corpus
@pytest.mark.parametrize("repo, folder", [
    ("dcm_qa", "In/Orientation/ax/axasc35"), ("dcm_qa_ge", "In/SliceTimingRT/2_epiRT_IntAsc_GD0"),
    ("dcm_qa_philips", "In/Magdeburg_2014/fmri"), ("dcm_qa_xa30", "In/7_func-bold_task-fa_run-1"),
])
def test_a_real_header_given_whole_gives_no_identifier(repo, folder):
    """Every top-level value of a real file, identifiers included, goes in; none comes out."""
    path, ds = _images(repo, folder)[0]
    everything = {el.keyword: coerce.normalise(el.value) for el in ds
                  if el.keyword and el.VR not in ("SQ", "OB", "OW", "UN") and el.value not in (None, "")}
    text = json.dumps(bids_sidecar(everything))
    for keyword in IDENTIFIERS:
        value = str(ds.get(keyword, "") or "").strip()
        if len(value) >= 3:
            assert value not in text, keyword


# --- 3. the rules, on inputs made by hand ------------------------------------------------

BASE = {"Modality": "MR", "Manufacturer": "SIEMENS", "MRAcquisitionType": "2D", "RepetitionTime": 2000.0}


def test_slice_timing_is_relative_to_the_first_slice_acquired_in_stored_order():
    out = bids_sidecar(BASE, slice_times=[10.5, 10.0, 11.25, 10.75])
    assert out["SliceTiming"] == [0.5, 0.0, 1.25, 0.75]
    assert "MultibandAccelerationFactor" not in out


def test_slices_acquired_together_give_the_multiband_factor():
    out = bids_sidecar(BASE, slice_times=[0.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    assert out["SliceTiming"] == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert out["MultibandAccelerationFactor"] == 2


def test_no_slice_timing_for_3d_acquisitions_or_without_times():
    assert "SliceTiming" not in bids_sidecar({**BASE, "MRAcquisitionType": "3D"}, slice_times=[0.0, 1.0])
    assert "SliceTiming" not in bids_sidecar(BASE, slice_times=[])
    assert "SliceTiming" not in bids_sidecar(BASE)


@pytest.mark.parametrize("direction, polarity, expected", [
    ("ROW", 1, ("PhaseEncodingDirection", "i")),
    ("ROW", 0, ("PhaseEncodingDirection", "i-")),
    ("COL", 1, ("PhaseEncodingDirection", "j")),   # dcm2niix, whose rows are flipped, says j-
    ("COL", 0, ("PhaseEncodingDirection", "j-")),
    ("COLUMN", 1, ("PhaseEncodingDirection", "j")),  # enhanced MR spells it out
    ("ROW", None, ("PhaseEncodingAxis", "i")),
    ("COL", None, ("PhaseEncodingAxis", "j")),
])
def test_phase_encoding_direction_is_relative_to_the_exported_voxel_axes(direction, polarity, expected):
    out = bids_sidecar({**BASE, "InPlanePhaseEncodingDirection": direction}, phase_polarity=polarity)
    key, value = expected
    assert out[key] == value
    assert ({"PhaseEncodingDirection", "PhaseEncodingAxis"} - {key}).isdisjoint(out)
    assert out["InPlanePhaseEncodingDirectionDICOM"] == ("ROW" if direction == "ROW" else "COL")


def test_3d_phase_encoding_is_reported_only_for_gradient_echo_trains():
    three_d = {**BASE, "MRAcquisitionType": "3D", "InPlanePhaseEncodingDirection": "COL"}
    assert not {"PhaseEncodingDirection", "PhaseEncodingAxis"} & set(bids_sidecar(three_d, phase_polarity=1))
    train = bids_sidecar({**three_d, "EchoTrainLength": 2.0, "ScanningSequence": "GR"}, phase_polarity=1)
    assert train["PhaseEncodingDirection"] == "j"
    spin = bids_sidecar({**three_d, "EchoTrainLength": 7.0, "ScanningSequence": "SE"}, phase_polarity=1)
    assert not {"PhaseEncodingDirection", "PhaseEncodingAxis"} & set(spin)


def test_ge_rectilinear_reordering_gives_the_polarity():
    ge = {**BASE, "Manufacturer": "GE MEDICAL SYSTEMS", "InPlanePhaseEncodingDirection": "COL"}
    linear = bids_sidecar({**ge, "RectilinearPhaseEncodeReordering": "LINEAR"})
    assert (linear["PhaseEncodingDirection"], linear["PhaseEncodingPolarityGE"]) == ("j-", "Flipped")
    reverse = bids_sidecar({**ge, "RectilinearPhaseEncodeReordering": "REVERSE_LINEAR"})
    assert (reverse["PhaseEncodingDirection"], reverse["PhaseEncodingPolarityGE"]) == ("j", "Unflipped")
    # only GE means this by it (Siemens XA writes LINEAR whatever the polarity)
    siemens = bids_sidecar({**BASE, "InPlanePhaseEncodingDirection": "COL",
                            "RectilinearPhaseEncodeReordering": "LINEAR"})
    assert siemens["PhaseEncodingAxis"] == "j"


def test_units_names_and_image_type_follow_dcm2niix():
    out = bids_sidecar({**BASE, "Manufacturer": "Philips Medical Systems", "EchoTime": 30.0,
                        "InversionTime": 900.0, "FlipAngle": 90.0, "ImagingFrequency": 127.7,
                        "ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
                        "SoftwareVersions": ["5.1.1", "5.1.1.0"], "EchoTrainLength": 1.0,
                        "AcquisitionMatrix": ["0", "64", "60", "0"], "Rows": 64.0, "Columns": 80.0,
                        "InPlanePhaseEncodingDirection": "ROW", "UnknownKeyword": "x"})
    assert (out["Manufacturer"], out["EchoTime"], out["InversionTime"]) == ("Philips", 0.03, 0.9)
    assert (out["RepetitionTime"], out["FlipAngle"], out["ImagingFrequency"]) == (2.0, 90.0, 127.7)
    assert out["ImageType"] == ["ORIGINAL", "PRIMARY", "M", "FFE", "M", "FFE", "MAGNITUDE"]
    assert out["SoftwareVersions"] == "5.1.1\\5.1.1.0"
    assert (out["AcquisitionMatrixPE"], out["ReconMatrixPE"]) == (60, 80)
    assert "EchoTrainLength" not in out and "UnknownKeyword" not in out
    assert out["ConversionSoftware"] == "voxelflow"
    mixed = bids_sidecar({**BASE, "ImageType": ["ORIGINAL", "PRIMARY", "T1", "MIXED"],
                          "ComplexImageComponent": "MAGNITUDE"})
    assert mixed["ImageType"] == ["ORIGINAL", "PRIMARY", "T1", "MIXED"]
    ge = bids_sidecar({**BASE, "Manufacturer": "GE MEDICAL SYSTEMS", "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"]},
                      extra={"ComplexImageComponent": "MAGNITUDE"})  # from GE's private (0043,102F)
    assert ge["ImageType"] == ["ORIGINAL", "PRIMARY", "OTHER", "MAGNITUDE"]


# GE slice timing, from a hand-made protocol block

def _ge_volume(n: int, *, order: str | None, mb: int | None = None, tr: float = 1200.0,
               delay: float | None = None, software: str = "28\\LX\\MR29.1_EA_2039.g",
               descending: bool = False, iopt: str = "EPI, FMRI") -> list[pydicom.Dataset]:
    lines = [f'IOPT "{iopt}"', f'NOSLC "{n}"'] + ([f'SLICEORDER "{order}"'] if order is not None else [])
    if mb:
        lines.append(f'MBACCEL "{mb}"')
    packed = gzip.compress("\n".join(lines).encode())
    volume = []
    for i in range(n):
        ds = pydicom.Dataset()
        ds.Manufacturer, ds.InstanceNumber, ds.RepetitionTime = "GE MEDICAL SYSTEMS", i + 1, tr
        ds.SoftwareVersions = software.split("\\")
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(n - 1 - i if descending else i) * 3.0]
        block = len(packed).to_bytes(4, "little") + packed  # a length, then the gzip stream
        ds.private_block(0x0025, "GEMS_SERS_01", create=True).add_new(0x1B, "OB", block)
        if delay is not None:
            ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x7C, "FL", delay)
        volume.append(ds)
    return volume


def test_ge_interleaved_slices_in_prescribed_order_then_sorted_along_the_normal():
    # prescribed (instance) order top to bottom: slices 0, 2, 4 are excited first
    times = timing.slice_times_ge(_ge_volume(6, order="1", descending=True)[::-1])
    assert times == pytest.approx([1.0, 0.4, 0.8, 0.2, 0.6, 0.0])  # bottom slice (instance 6) first


def test_ge_multiband_and_the_extra_excitation_before_release_27_r3():
    assert timing.slice_times_ge(_ge_volume(6, order="0", mb=2, tr=900.0)) == pytest.approx(
        [0.0, 0.3, 0.6, 0.0, 0.3, 0.6])
    # 27.0 R02: 8 slices at multiband 2 are 4 excitations, an even number, so 5 are timed
    old = _ge_volume(8, order="0", mb=2, tr=1000.0, software="27\\LX\\MR Software release:RX27.0_R02_1831.a")
    assert timing.slice_times_ge(old) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.0, 0.2, 0.4])


def test_ge_group_delay_lengthens_the_tr_not_the_slice_spacing():
    volume = _ge_volume(4, order="0", tr=2000.0, delay=1.0)
    assert timing.repetition_time_ge(volume[0]) == pytest.approx(3000.0)
    assert timing.slice_times_ge(volume) == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert timing.slice_times_ge(_ge_volume(4, order="0", iopt="EPI, MPhVar")) is None  # variable delays
    assert timing.slice_times_ge(_ge_volume(1, order="0")) is None


def test_ge_user_data_block_gives_polarity_and_view_order_reverses_it():
    def user_data(flipped: bool, bottom_up: bool) -> pydicom.Dataset:
        raw = bytearray(1200)
        raw[24:26] = (100).to_bytes(2, "little")  # header offset
        raw[100:104] = np.float32(24.0).tobytes()  # header version (< 25.002: no shift)
        raw[100 + 0x3A:100 + 0x3C] = (0x0800).to_bytes(2, "little")  # EPI
        raw[100 + 0x30:100 + 0x32] = (4 if flipped else 0).to_bytes(2, "little")
        raw[100 + 0x394:100 + 0x396] = (2 if bottom_up else 0).to_bytes(2, "little")
        ds = pydicom.Dataset()
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2A, "OB", bytes(raw))
        return ds

    assert timing.phase_polarity_ge(user_data(flipped=True, bottom_up=False)) == 0
    assert timing.phase_polarity_ge(user_data(flipped=False, bottom_up=False)) == 1
    assert timing.phase_polarity_ge(user_data(flipped=True, bottom_up=True)) == 1
    reordered = user_data(flipped=True, bottom_up=False)
    reordered.RectilinearPhaseEncodeReordering = "REVERSE_LINEAR"  # the standard tag wins
    assert timing.phase_polarity_ge(reordered) == 1


# Siemens XA: per-frame private times and polarity

def _xa_volume(times: list[float], z: list[float], polarity: str = "1") -> pydicom.Dataset:
    from pydicom.sequence import Sequence

    frames = []
    for t, position in zip(times, z):
        inner = pydicom.Dataset()
        block = inner.private_block(0x0021, "SIEMENS MR SDI 02", create=True)
        block.add_new(0x04, "DS", str(t))
        block.add_new(0x1C, "IS", polarity)
        frame = pydicom.Dataset()
        frame.private_block(0x0021, "SIEMENS MR SDI 02", create=True).add_new(0xFE, "SQ", Sequence([inner]))
        plane = pydicom.Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, position]
        frame.PlanePositionSequence = Sequence([plane])
        frames.append(frame)
    ds = pydicom.Dataset()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


def test_xa_frame_times_sorted_along_the_normal_from_the_second_volume():
    first = _xa_volume([0.2, 0.0, 0.1], [4.0, 0.0, 2.0])
    second = _xa_volume([9.9, 9.5, 9.6], [4.0, 0.0, 2.0], polarity="0")
    assert timing.slice_times_from_frames([first]) == pytest.approx([0.0, 0.1, 0.2])
    assert timing.slice_times_from_frames([first, second]) == pytest.approx([9.5, 9.6, 9.9])
    assert bids_sidecar(BASE, slice_times=timing.slice_times_from_frames([first, second]))["SliceTiming"] == \
        pytest.approx([0.0, 0.1, 0.4])
    assert (timing.phase_polarity_from_frames(first), timing.phase_polarity_from_frames(second)) == (1, 0)


def test_functional_groups_give_standard_values_and_skip_private_ones():
    from pydicom.sequence import Sequence

    timing, echo, private = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    timing.RepetitionTime, timing.FlipAngle = 1000.0, 60.0
    echo.EffectiveEchoTime = 30.0
    private.RepetitionTime = 9999.0  # a classic header inside Philips' private per-frame sequence
    shared, frame = pydicom.Dataset(), pydicom.Dataset()
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    frame.MREchoSequence = Sequence([echo])
    frame.private_block(0x2005, "Philips MR Imaging DD 005", create=True).add_new(0x0F, "SQ", Sequence([private]))
    ds = pydicom.Dataset()
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    extra = sidecar.functional_group_attributes(ds)
    assert extra == {"RepetitionTime": 1000.0, "FlipAngle": 60.0, "EffectiveEchoTime": 30.0}
    out = bids_sidecar(BASE, extra=extra)
    assert (out["RepetitionTime"], out["EchoTime"], out["FlipAngle"]) == (1.0, 0.03, 60.0)


@needs_corpus
def test_mosaic_times_come_from_the_second_volume_only_when_the_first_is_off():
    def volumes(folder: str) -> list[pydicom.Dataset]:
        return sorted((d for _, d in _images("dcm_qa", folder)), key=lambda d: int(d.InstanceNumber))

    bogus = volumes("In/Orientation/axmb/AxInt36mb")  # CMRR's first volume spans 0..8.6e7 ms
    times = timing.slice_times_from_csa(bogus)
    assert max(times) < 3.0 and times == pytest.approx(timing._mosaic_times(bogus[1]))
    steady = volumes("In/Orientation/ax/axasc36")  # both span 2.44 s: the first volume's
    assert timing.slice_times_from_csa(steady) == pytest.approx(timing._mosaic_times(steady[0]))
    assert timing._mosaic_times(steady[0]) != pytest.approx(timing._mosaic_times(steady[1]))
    uneven = volumes("In/Orientation/ax/axasc35")  # 2.4375 s then 2.44 s: the second volume's
    assert timing.slice_times_from_csa(uneven) == pytest.approx(timing._mosaic_times(uneven[1]))
    sagittal = volumes("In/Orientation/sag/sagasc36")[0]  # CSA normal against row x column
    assert timing._mosaic_times(sagittal)[0] == pytest.approx(max(timing._mosaic_times(sagittal)))
