"""Reading DICOM attribute values the way the rest of the package needs them: numbers from
DS/IS strings, lists of a fixed length, DICOM times as seconds, the allow-listed technical
attributes. Works on a pydicom ``Dataset`` and on the fast reader's
:class:`~voxelflow.io.dicom.fast_header.FastHeader` alike (both have ``get``)."""

from __future__ import annotations

import math
from typing import Any

import pydicom
from pydicom.multival import MultiValue

from voxelflow.deid import TECHNICAL_ATTRIBUTES
from voxelflow.errors import CorruptFileError


def float_list(ds: pydicom.Dataset, keyword: str, n: int, where: str | None = None) -> list[float] | None:
    """``n`` numbers of a multi-valued attribute; None when absent. Malformed (not numbers,
    or not ``n`` of them): None, or with ``where`` (the file) :class:`CorruptFileError`."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    except (TypeError, ValueError):
        return _malformed(where, keyword, value, f"{n} numbers")
    return values if len(values) == n else _malformed(where, keyword, value, f"{n} numbers")


def number(ds: pydicom.Dataset, keyword: str, where: str | None = None) -> float | None:
    """An attribute's (first) number; None when absent. Malformed: None, or with ``where``
    (the file) :class:`CorruptFileError` (the attributes a volume's geometry and values
    depend on are read that way: read as missing, a malformed RescaleSlope would store the
    slice unscaled without a word)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        first = value[0] if isinstance(value, (list, tuple, MultiValue)) else value
        result = float(first)
    except (TypeError, ValueError, IndexError):
        return _malformed(where, keyword, value, "a number")
    if not math.isfinite(result):
        return _malformed(where, keyword, value, "a finite number")
    return result


def integer(ds: pydicom.Dataset, keyword: str, where: str | None = None) -> int | None:
    value = number(ds, keyword, where)
    return None if value is None else int(round(value))


def _malformed(where: str | None, keyword: str, value: Any, expected: str) -> None:
    if where is None:
        return None
    text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple, MultiValue)) else str(value)
    raise CorruptFileError(where, f"{keyword} is {text[:64]!r}, expected {expected}")


def technical_attributes(ds: pydicom.Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyword in TECHNICAL_ATTRIBUTES:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, (list, MultiValue)):
            value = [str(v) for v in value]
        elif isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.IS, float, int)):
            value = float(value)
        else:
            value = str(value)
        out[keyword] = value
    return out



def seconds(value) -> float | None:
    """A DICOM TM (HHMMSS.FFFFFF) as seconds after midnight; None when absent or malformed."""
    text = str(value or "").strip().replace(":", "")
    try:
        return int(text[0:2]) * 3600 + int(text[2:4] or 0) * 60 + float(text[4:] or 0) if len(text) >= 2 else None
    except ValueError:
        return None

