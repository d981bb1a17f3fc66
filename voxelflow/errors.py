"""Typed errors.

Two families, kept apart because the pipeline treats them differently:

* :class:`InvalidInputError` — the input itself is bad (a corrupt file, a series that cannot
  be stacked consistently). Recorded in the catalog with its reason and skipped; retrying
  cannot help, so tasks never retry these.
* :class:`StoreError` — a transient or environmental failure while reading or writing
  (I/O error, store unavailable). Tasks retry these (and other ``OSError`` that are not a
  voxelflow error or a missing file).

User mistakes outside the input files are :class:`SettingError` (a setting) and
:class:`NotInStoreError` (a volume, model or split the store does not hold); the CLI turns
any :class:`VoxelflowError` into one line and exit status 2.

As in zarr-python, each error also derives from the matching builtin so callers can catch
either (``except ValueError`` still works for bad input).
"""

from __future__ import annotations


class VoxelflowError(Exception):
    """Base class of every voxelflow error."""


class InvalidInputError(VoxelflowError, ValueError):
    """An input file or series is unusable. Never retried; recorded with its reason.

    Args:
        where: the file (path relative to its source root) or series the error is about.
        reason: what is wrong, with the offending value and what was expected.
    """

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


class NotAnImageError(InvalidInputError):
    """The file is readable but holds no image data voxelflow converts (e.g. a DICOMDIR,
    a structured report, a text file). Recorded as ``skipped``, not ``failed``."""


class CorruptFileError(InvalidInputError):
    """The file cannot be parsed: truncated, corrupt or mislabelled."""


class UnsupportedDataError(InvalidInputError):
    """The file is valid but uses a feature voxelflow does not convert (yet)."""


class PixelDecodeError(InvalidInputError):
    """The pixel data cannot be decoded (unsupported or broken compressed stream)."""


class SeriesAssemblyError(InvalidInputError):
    """The images of a series cannot be stacked into a consistent volume."""


class StoreError(VoxelflowError, OSError):
    """A store could not be read or written. Transient errors of this kind are retried."""


class NotInStoreError(VoxelflowError, FileNotFoundError):
    """Something asked for is not in the store (a volume, a model, a split, a source file
    of a volume): the user's mistake or an earlier stage not run, never transient, so never
    retried although it is a ``FileNotFoundError``."""


class SettingError(VoxelflowError, ValueError):
    """A setting (a config field, a command-line option) is invalid, contradicts another, or
    selects nothing from the store (no training volume with that label, no volumes at all)."""


class SourceError(VoxelflowError, FileNotFoundError):
    """A source given on the command line does not exist or cannot be opened at all."""


class DuplicateKeyError(VoxelflowError, RuntimeError):
    """Two catalog rows that must be unique share a key (``source`` + ``path``, or
    ``volume_id``): a bug in what produced them, never bad input, so it stops the run."""


class ConfigurationError(VoxelflowError, RuntimeError):
    """voxelflow cannot run as configured (missing key, unreachable server, ...)."""


class LabelError(InvalidInputError):
    """A segmentation or class label cannot be attached to its image: no matching volume,
    a grid that does not cover the image, values that are not labels, conflicting labels."""
