"""Loose coercion of DICOM values, as pydicom or the header scan give them (numbers, text,
lists of strings, DS/IS objects), to plain Python: what the sidecar and the vendor timing
rules read. Malformed or absent values become None or the default; these are descriptive
fields of a sidecar, never a volume's geometry or values (those use :mod:`.values`)."""

from __future__ import annotations

import math
from typing import Any

import pydicom
from pydicom.multival import MultiValue


def normalise(value: Any) -> Any:
    """A pydicom value in the header scan's form (see values.technical_attributes)."""
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    if isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.IS, float, int)):
        return float(value)
    return str(value)


def present(value: Any) -> bool:
    return value is not None and value != "" and value != []


def strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split("\\")]


def text(value: Any) -> str:
    return "\\".join(strings(value)) if value is not None else ""


def num(value: Any) -> float | None:
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if value else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def integer_or_none(value: Any) -> int | None:
    number = num(value)
    return None if number is None else int(round(number))


def int_or(value: Any, default: int) -> int:
    number = integer_or_none(value)
    return default if number is None else number
