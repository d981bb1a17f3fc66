"""What vendors write outside the standard attributes, and what it means.

Scanners tell images at one slice position apart in private attributes as often as in
standard ones: GE's image type (0043,102F) says magnitude, phase, real or imaginary; GE keeps
diffusion b-values and directions only in (0043,1039) and (0019,10BB-BD); Philips keeps its
floating-point scale in (2005,100E) and its diffusion direction label in (2001,1004); Siemens
keeps b-values in (0019,100C). dcm2niix reads the same tags (its per-vendor notes describe
them); this module is voxelflow's one place for them.

Private tags are read at the element numbers vendors use in practice (the private creator's
block 0x10), as dcm2niix reads them, and only for the vendor that defines them: (0019,10BB)
means something else in a Siemens file. Their values are technical (no identifiers), so they
may enter the de-identified record; nothing else private does.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

# tag -> (name, VR). The VR matters for implicit-VR files, where the file does not say it.
PRIVATE_TAGS: dict[int, tuple[str, str]] = {
    0x00431039: ("GE_SlopInt", "IS"),  # slop_int_1..4: b-value first
    0x001910BB: ("GE_GradientX", "DS"),
    0x001910BC: ("GE_GradientY", "DS"),
    0x001910BD: ("GE_GradientZ", "DS"),
    0x0043102F: ("GE_ImageType", "SS"),  # 0 magnitude, 1 phase, 2 real, 3 imaginary
    0x2005100E: ("Philips_ScaleSlope", "FL"),  # MR scale slope: precise (floating point) values
    0x20011003: ("Philips_BFactor", "FL"),
    0x20011004: ("Philips_DiffusionDirection", "CS"),  # "I" isotropic, "O" oblique, "M", "P", "S", "R"...
    0x0019100C: ("Siemens_BValue", "IS"),
    0x0019100E: ("Siemens_DiffusionGradientDirection", "FD"),
}
PRIVATE_NAMES = {name: tag for tag, (name, _) in PRIVATE_TAGS.items()}


def vendor(manufacturer: str | None) -> str:
    """The vendor a Manufacturer string names, as the rules below know them ("" when none)."""
    text = (manufacturer or "").upper()
    for key, name in (("GE ", "GE"), ("GE_", "GE"), ("GENERAL ELECTRIC", "GE"), ("PHILIPS", "Philips"),
                      ("SIEMENS", "Siemens"), ("CANON", "Canon"), ("TOSHIBA", "Canon"), ("HITACHI", "Hitachi"),
                      ("FUJIFILM", "Hitachi"), ("UIH", "UIH"), ("UNITED IMAGING", "UIH")):
        if key in text + " ":
            return name
    return (manufacturer or "").strip()


_COMPONENT_TOKENS = {"M": "magnitude", "MAGNITUDE": "magnitude", "P": "phase", "PHASE": "phase",
                     "R": "real", "REAL": "real", "I": "imaginary", "IMAGINARY": "imaginary"}
_GE_COMPONENT = {0: "magnitude", 1: "phase", 2: "real", 3: "imaginary"}


def component(image_type: str, vendor_name: str, private: Callable[[str], Any],
              complex_component: str | None = None) -> str:
    """What the pixel values are: ``magnitude``, ``phase``, ``real``, ``imaginary`` or
    ``fieldmap_hz`` ("" when nothing says). A field map in Hz (Philips' B0 map) is told by a
    FIELD_MAP or B0 token in ImageType / FrameType; the complex part by the enhanced
    ComplexImageComponent, GE's private image type, or the third and fourth ImageType values
    (Siemens ``ORIGINAL\\PRIMARY\\P\\ND``, Philips ``ORIGINAL\\PRIMARY\\M_FFE\\M\\FFE``)."""
    tokens = [t.strip().upper() for t in (image_type or "").split("\\")]
    if "FIELD_MAP" in tokens or "B0" in tokens or "B0 MAP" in tokens:
        return "fieldmap_hz"
    if complex_component and complex_component.upper() in _COMPONENT_TOKENS:
        return _COMPONENT_TOKENS[complex_component.upper()]
    if vendor_name == "GE":
        value = private("GE_ImageType")
        if isinstance(value, (int, float)) and int(value) in _GE_COMPONENT:
            return _GE_COMPONENT[int(value)]
    if "PHASE MAP" in tokens:
        return "phase"
    for token in tokens[2:4]:
        if token in _COMPONENT_TOKENS:
            return _COMPONENT_TOKENS[token]
    return ""


def _numbers(value: Any) -> list[float]:
    if value is None or value == "":
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return []


def diffusion(vendor_name: str, get: Callable[[str], Any], private: Callable[[str], Any],
              orientation: list[float] | None = None) -> tuple[float | None, list[float] | None, bool | None]:
    """``(b-value, unit gradient direction in the patient frame (LPS), isotropic)`` of one
    image, from the standard DiffusionBValue / DiffusionGradientOrientation, else the
    vendor's private attributes (GE's in the image frame: ``orientation`` is the image's
    ImageOrientationPatient); ``(None, None, None)`` when it is not a diffusion image.
    A direction of zero length with b > 0 is an isotropic (trace) image, which dcm2niix
    leaves out of the 4-D DWI; so does voxelflow (it becomes a volume of its own)."""
    b = _numbers(get("DiffusionBValue"))
    g = _numbers(get("DiffusionGradientOrientation"))
    label = ""
    ge_private = False
    if vendor_name == "GE":
        slop = _numbers(private("GE_SlopInt"))
        if not b and slop:
            # Some GE releases add 10^9 to the b-value to flag it (dcm2niix strips it too).
            b = [slop[0] % 1e9 if slop[0] >= 1e9 else slop[0]]
        if not g:
            ge_private = True
            g = _numbers(private("GE_GradientX")) + _numbers(private("GE_GradientY")) + \
                _numbers(private("GE_GradientZ"))
            if len(g) == 3 and orientation:
                # GE's vector is in the image frame (row, column, slice normal) with the
                # in-plane signs flipped; in the patient frame it is -x row - y col + z normal
                # (dcm2niix's bvecs in world space agree, checked on the corpus' GE DWI).
                row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
                g = list(-g[0] * row - g[1] * col + g[2] * np.cross(row, col))
    elif vendor_name == "Philips":
        b = b or _numbers(private("Philips_BFactor"))
        label = str(private("Philips_DiffusionDirection") or "").strip().upper()
    elif vendor_name == "Siemens":
        b = b or _numbers(private("Siemens_BValue"))
        g = g or _numbers(private("Siemens_DiffusionGradientDirection"))
    if not b:
        return None, None, None
    bval = float(b[0])
    vec = np.asarray(g[:3], float) if len(g) >= 3 else np.zeros(3)
    norm = float(np.linalg.norm(vec))
    isotropic = bval > 0 and (norm < 1e-6 or label == "I")
    # GE's private directions are up to 0.1 % off unit length and dcm2niix writes them as they
    # are; the standard and other vendors' directions are normalised, as dcm2niix does.
    scale = 1.0 if ge_private else norm
    gradient = [float(v) / scale for v in vec] if norm >= 1e-6 else [0.0, 0.0, 0.0]
    return bval, gradient, isotropic


def philips_precise(slope: float, intercept: float, scale_slope: float | None) -> tuple[float, float]:
    """Philips' floating-point ("precise") values from stored ones: ``FP = (SV * RS + RI) /
    (RS * SS)`` with RS/RI the rescale and SS the private scale slope, so slope ``1 / SS``
    and intercept ``RI / (RS * SS)``. dcm2niix applies this by default (``-p y``); the
    rescaled ("display") values differ from it by a factor per series, which breaks
    quantitative maps (field maps in Hz, phase in radians) and comparisons between series."""
    if not scale_slope or not slope:
        return slope, intercept
    return 1.0 / scale_slope, intercept / (slope * scale_slope)
