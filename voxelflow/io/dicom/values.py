"""Reading DICOM attribute values the way the rest of the package needs them: numbers from
DS/IS strings, lists of a fixed length, DICOM times as seconds, the allow-listed technical
attributes. Works on a pydicom ``Dataset`` and on the fast reader's
:class:`~voxelflow.io.dicom.fast_header.FastHeader` alike (both have ``get``)."""

from __future__ import annotations

from typing import Any

import pydicom
from pydicom.multival import MultiValue

from voxelflow.deid import TECHNICAL_ATTRIBUTES


def float_list(ds: pydicom.Dataset, keyword: str, n: int) -> list[float] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def number(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = number(ds, keyword)
    return None if value is None else int(round(value))


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

