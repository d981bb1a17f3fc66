"""A fast reader for the few top-level DICOM attributes ingest needs.

pydicom parses every element and converts each value on access: about 2 ms per file here,
more than dcm2niix spends on a whole file. Ingest reads ~50 top-level attributes of images
that are, in nearly every archive, plain Part 10 files in (implicit or explicit) little-endian
syntax. This module walks such a file's bytes once, skips what it does not need (sequences
included), and converts only the wanted values, to the same Python values pydicom's
``Dataset.get`` gives (numbers as ``float``/``int``, multi-values as lists of the stored
strings, text stripped as pydicom strips it).

Anything it is not sure to read exactly as pydicom does makes :func:`read_header` return
``None``, and the caller parses the file with pydicom: files without a Part 10 preamble,
big-endian or deflated syntaxes, non-ASCII text (character sets), malformed numbers, enhanced
multi-frame images (their geometry is in sequences), DICOMDIRs, ISO 2022 escapes, float pixel data, a header
(or encapsulated pixel data) longer than the bytes given, or any structural oddity. ``tests/io/test_fast_header.py`` checks
that both readers give the same scan records on every real file we have.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from voxelflow.deid import TECHNICAL_ATTRIBUTES
from voxelflow.io.dicom.vendor import PRIVATE_TAGS

# Top-level attributes scan_dicom reads (the technical attributes copied to the catalog too).
KEYWORDS = tuple(dict.fromkeys((
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
    "PatientID", "PatientName", "PatientBirthDate", "Modality", "ImageType",
    "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "PhotometricInterpretation", "NumberOfFrames",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "InstanceNumber", "AcquisitionNumber", "EchoNumbers",
    "TemporalPositionIdentifier", "AcquisitionTime", "ContentTime", "RepetitionTime",
    "RescaleSlope", "RescaleIntercept", "TriggerTime", "DiffusionBValue", "DiffusionGradientOrientation",
    *TECHNICAL_ATTRIBUTES,
)))
WANTED = {tag_for_keyword(k): k for k in KEYWORDS}
# Their presence sends the file to pydicom: per-frame geometry, directory records.
FALLBACK_TAGS = {tag_for_keyword("PerFrameFunctionalGroupsSequence"),
                 tag_for_keyword("DirectoryRecordSequence")}
PIXEL_DATA = 0x7FE00010
OTHER_PIXEL_TAGS = {0x7FE00008, 0x7FE00009}  # float / double float pixel data: pydicom
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Syntaxes whose dataset is explicit VR little endian: the native one and the encapsulated
# (compressed) ones. Big endian and deflated go to pydicom.
_ENCAPSULATED_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.8.")
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
TEXT_VRS = {"LT", "ST", "UT", "UR"}  # one value; backslash is not a separator
STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
              "UI", "UR", "UT"}
BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


class _Fallback(Exception):
    """Not read here: pydicom reads this file."""


class FastHeader:
    """The wanted top-level values of one file, read like ``pydicom.Dataset.get``."""

    __slots__ = ("values", "file_meta", "pixel_keyword", "pixel_length", "pixel_tell", "n_elements")

    def __init__(self, values: dict[str, Any], file_meta: dict[str, str], pixel: tuple | None, n_elements: int):
        self.values = values
        self.file_meta = file_meta
        self.pixel_keyword, self.pixel_length, self.pixel_tell = pixel or (None, None, None)
        self.n_elements = n_elements

    def get(self, keyword: str, default: Any = None) -> Any:
        return self.values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.values or keyword == self.pixel_keyword


@lru_cache(maxsize=None)
def _dictionary_vr(tag: int) -> str:
    return dictionary_VR(tag)


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """``(tag, vr, length, value_offset)`` of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _Fallback("header runs past the bytes read")
    group, elem = _TAG.unpack_from(buf, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4:pos + 6]
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Fallback("not an explicit VR")
    if vr in LONG_VRS:
        if pos + 12 > len(buf):
            raise _Fallback("header runs past the bytes read")
        return tag, vr.decode(), _U32.unpack_from(buf, pos + 8)[0], pos + 12
    return tag, vr.decode(), _U16.unpack_from(buf, pos + 6)[0], pos + 8


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """Skip the items of an undefined-length sequence; returns the offset after its end."""
    while True:
        tag, _, length, pos = _element(buf, pos, True)
        if tag == SEQ_END:
            return pos
        if tag != ITEM:
            raise _Fallback("unexpected element in a sequence")
        pos = _skip_item(buf, pos, implicit) if length == UNDEFINED else pos + length


def _skip_item(buf: bytes, pos: int, implicit: bool) -> int:
    """Skip the elements of an undefined-length item up to its delimiter."""
    while True:
        tag, vr, length, pos = _element(buf, pos, implicit)
        if tag == ITEM_END:
            return pos
        if length == UNDEFINED:
            # UN with undefined length holds an implicit VR little-endian sequence
            pos = _skip_sequence(buf, pos, implicit or vr == "UN")
        else:
            pos += length


def convert_value(keyword: str, vr: str, raw: bytes) -> Any:
    """A value from its raw little-endian bytes, as ``pydicom.Dataset.get`` gives it."""
    if vr in BINARY:
        fmt = BINARY[vr]
        size = struct.calcsize(fmt)
        if len(raw) % size:
            raise _Fallback(f"{keyword}: length not a multiple of {size}")
        values = list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))
        if not values:
            return None
        return values[0] if len(values) == 1 else values
    if vr not in STRING_VRS:
        raise _Fallback(f"{keyword}: VR {vr}")
    if not raw.isascii() or b"\x1b" in raw:
        raise _Fallback(f"{keyword}: non-ASCII text")  # character sets: pydicom decodes them
    text = raw.decode("ascii")
    if vr == "UI":
        return text.rstrip("\x00 ")
    if vr in TEXT_VRS:
        return text.rstrip("\x00 ")
    text = text.rstrip("\x00 ")
    if vr == "PN":
        parts = text.split("\\")
        return parts[0] if len(parts) == 1 else parts
    parts = text.split("\\")  # pydicom strips the whole value's trailing spaces, not each part's
    if vr in ("DS", "IS"):
        return _numbers(keyword, vr, parts)
    return parts[0] if len(parts) == 1 else parts


def _numbers(keyword: str, vr: str, parts: list[str]) -> Any:
    if parts == [""]:
        return ""
    for p in parts:
        try:
            number = float(p)
        except ValueError:
            raise _Fallback(f"{keyword}: {p!r} is not a {vr}") from None
        if vr == "IS" and number != int(number):
            raise _Fallback(f"{keyword}: {p!r} is not an integer")
    if len(parts) == 1:
        return float(parts[0]) if vr == "DS" else int(float(parts[0]))
    return parts


def read_header(buf: bytes) -> FastHeader | None:
    """The wanted attributes of the Part 10 file whose first bytes are ``buf``, or ``None``
    when pydicom must read it (see the module docstring)."""
    try:
        return _read(buf)
    except (_Fallback, struct.error, UnicodeDecodeError, KeyError, ValueError):
        return None


def _read(buf: bytes) -> FastHeader:
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _Fallback("no Part 10 preamble")
    pos = 132
    meta: dict[str, str] = {}
    while pos + 8 <= len(buf) and _U16.unpack_from(buf, pos)[0] == 0x0002:
        tag, vr, length, vpos = _element(buf, pos, False)
        if length == UNDEFINED or vpos + length > len(buf):
            raise _Fallback("file meta information")
        if tag == 0x00020010:
            meta["TransferSyntaxUID"] = buf[vpos:vpos + length].decode("ascii").rstrip("\x00 ")
        elif tag == 0x00020002:
            meta["MediaStorageSOPClassUID"] = buf[vpos:vpos + length].decode("ascii").rstrip("\x00 ")
        pos = vpos + length
    syntax = meta.get("TransferSyntaxUID", "")
    if syntax == IMPLICIT_LE:
        implicit = True
    elif syntax == EXPLICIT_LE or syntax.startswith(_ENCAPSULATED_PREFIXES):
        implicit = False
    else:
        raise _Fallback(f"transfer syntax {syntax!r}")
    values: dict[str, Any] = {}
    pixel = None
    n = 0
    last = -1
    while pos < len(buf):
        tag, vr, length, vpos = _element(buf, pos, implicit)
        if tag <= last or tag >> 16 == 0xFFFE:
            raise _Fallback("elements out of order")
        last = tag
        n += 1
        if tag == PIXEL_DATA:
            if length == UNDEFINED:  # encapsulated: pydicom reads to the end of the fragments
                _skip_sequence(buf, vpos, True)  # so a truncated one goes to pydicom too
            pixel = ("PixelData", length, vpos)
            break
        if tag in OTHER_PIXEL_TAGS or tag in FALLBACK_TAGS:
            raise _Fallback("needs pydicom")
        if length == UNDEFINED:
            if vr not in (None, "SQ", "UN"):
                raise _Fallback("undefined length outside a sequence")
            pos = _skip_sequence(buf, vpos, implicit or vr == "UN")
            continue
        if vpos + length > len(buf):
            raise _Fallback("value runs past the bytes read")
        keyword = WANTED.get(tag)
        if keyword is None and tag in PRIVATE_TAGS:
            name, private_vr = PRIVATE_TAGS[tag]
            value = convert_value(name, private_vr if vr in (None, "UN") else vr, buf[vpos:vpos + length])
            if value is not None:
                values[name] = value
        elif keyword is not None:
            dvr = _dictionary_vr(tag)
            use = dvr if vr in (None, "UN") else vr
            if use != dvr:  # ambiguous in the dictionary, or written with another VR
                raise _Fallback(f"{keyword}: VR {use}, dictionary {dvr}")
            value = convert_value(keyword, use, buf[vpos:vpos + length])
            if value is not None:
                values[keyword] = value
        pos = vpos + length
    if n == 0:
        raise _Fallback("no elements")
    return FastHeader(values, meta, pixel, n)
