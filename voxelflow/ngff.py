"""OME-Zarr (NGFF) multiscale metadata: what a volume's or label's ``zarr.json`` says.

Volumes are written as OME-Zarr 0.6, whose coordinate systems and transformations (RFC-5)
carry the exact voxel-to-world affine, so a viewer that reads 0.6 places an oblique or
sheared (gantry tilt) volume where the scanner put it. Stores written before hold 0.5, which
has only scale and translation; they keep opening (:func:`datasets`, :func:`level_scale`
read both), and a label added to a 0.5 volume is written as 0.5, because the NGFF version
must be the same throughout one hierarchy.

One 0.6 multiscale entry (3-D; a 4-D image puts its ``t`` or ``c`` axis first in both
coordinate systems, with an identity row in the affine)::

    "coordinateSystems": [
      {"name": "RAS", "axes": [z, y, x]},        # world: RAS+ millimetres, listed z, y, x
      {"name": "intrinsic", "axes": [z, y, x]}], # the voxel grid's own axes, in mm
    "datasets": [                                # array index -> intrinsic, one per level
      {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [sz, sy, sx],
        "input": {"path": "s0"}, "output": {"name": "intrinsic"}}]},
      {"path": "s1", "coordinateTransformations": [
        {"type": "sequence", "transformations": [{"type": "scale", ...},
         {"type": "translation", ...}], "input": {"path": "s1"}, "output": {"name": "intrinsic"}}]}],
    "coordinateTransformations": [               # intrinsic -> world, the same for every level
      {"type": "affine", "affine": [[...4 numbers], x3], "input": {"name": "intrinsic"},
       "output": {"name": "RAS"}}]

Conventions, as the 0.6 specification states them:

* Parameters follow the order of a coordinate system's ``axes``: arrays, and so both
  systems, are ordered ``(z, y, x)``, while voxelflow's affine (:mod:`voxelflow.geometry`)
  maps index ``(x, y, z)`` = ``(i, j, k)``. The NGFF affine is that matrix with its columns
  divided by the voxel sizes (the intrinsic system is in mm, not voxels) and its rows and
  columns reversed.
* ``affine`` is the upper ``N x (N+1)`` block of the homogeneous matrix (translation last,
  the ``[0 .. 0 1]`` row omitted), applied to column vectors of points of the input system.
* World axis ``x`` points to the patient's right, ``y`` anterior and ``z`` superior (RAS+,
  NIfTI's convention; DICOM's LPS+ negates x and y), in millimetres; each world axis also says
  so as an RFC-4 ``orientation``. The world axes are named like the array's so that readers
  which take axis names from either system agree.
* The intrinsic system is the last entry of ``coordinateSystems``: the dataset transforms
  point at it and the multiscale transform leaves it.
* Level 0 has a bare ``scale``; the averaged levels below it add a ``translation`` (their
  voxel 0 is the centre of the block it averages), as a ``sequence`` of the two.

The multiscale entry also keeps 0.5's ``axes`` (the intrinsic axes): 0.6 moved them into
``coordinateSystems``, but readers written for 0.5 (ome-zarr-py 0.18, napari-ome-zarr) look
for axis names and units there, and the 0.6 schema allows the extra key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxelflow.errors import UnsupportedDataError

NGFF_VERSION = "0.6"  # what new volumes are written as
LEGACY_VERSION = "0.5"  # what stores written before hold
READABLE_VERSIONS = (NGFF_VERSION, LEGACY_VERSION)
INTRINSIC = "intrinsic"
WORLD = "RAS"

# (z, y, x) <-> (x, y, z): reverses the spatial axes (its own inverse)
_REVERSE = np.eye(3)[::-1]

# RAS+ as RFC-4 anatomical orientations (the direction in which each world coordinate grows).
# RFC-4 is adopted after 0.6; the 0.6 schema allows the key, and readers that know it (ngff-zarr)
# read it. Not ``longName``: ngff-zarr 0.50 refuses an axis that has one.
_WORLD_ORIENTATION = {"x": "left-to-right", "y": "posterior-to-anterior", "z": "inferior-to-superior"}


@dataclass(frozen=True)
class Level:
    """One pyramid level: where its array is and where its voxels lie on the intrinsic grid.

    ``scale`` and ``translation`` have one entry per array axis ``([t|c,] z, y, x)``:
    millimetres (seconds for ``t``) per voxel, and the position of voxel 0's centre.
    """

    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


def array_axes(ndim: int, channels: str | None = None) -> list[dict[str, str]]:
    """Axes of a stored array ``([t|c,] z, y, x)``: the intrinsic coordinate system's."""
    axes = [{"name": n, "type": "space", "unit": "millimeter"} for n in ("z", "y", "x")]
    if ndim == 4:
        axes.insert(0, {"name": "c", "type": "channel"} if channels else
                    {"name": "t", "type": "time", "unit": "second"})
    return axes


def world_axes(ndim: int, channels: str | None = None) -> list[dict[str, Any]]:
    """Axes of the world coordinate system: RAS+ millimetres, listed ``z, y, x``."""
    axes = array_axes(ndim, channels)
    for axis in axes:
        if axis["type"] == "space":
            axis["orientation"] = {"type": "anatomical", "value": _WORLD_ORIENTATION[axis["name"]]}
    return axes


def intrinsic_to_world(affine: np.ndarray, spacing_xyz: np.ndarray, ndim: int) -> list[list[float]]:
    """The NGFF ``affine`` parameters from the intrinsic grid (mm, ``(z, y, x)``) to RAS.

    With voxelflow's affine ``world = M @ (i, j, k) + t`` and the spacing ``D = diag(|M|
    columns)``, an intrinsic point is ``R @ D @ (i, j, k)`` (``R`` reverses the axes), so
    ``world_zyx = R M D^-1 R @ intrinsic + R t``.

    Raises:
        ValueError: an index axis of ``affine`` has no length (no geometry to write).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing_xyz = np.asarray(spacing_xyz, dtype=np.float64)
    if not (spacing_xyz > 0).all():
        raise ValueError(f"affine has an index axis of zero length (voxel sizes {spacing_xyz.tolist()} mm); "
                         f"expected a non-degenerate 4x4 voxel-to-world affine")
    linear = _REVERSE @ affine[:3, :3] @ np.diag(1.0 / spacing_xyz) @ _REVERSE
    block = np.concatenate([linear, (_REVERSE @ affine[:3, 3])[:, None]], axis=1)
    if ndim == 4:  # time or channel passes through unchanged
        block = np.concatenate([np.zeros((3, 1)), block], axis=1)
        block = np.concatenate([np.eye(1, 5), block], axis=0)
    return block.tolist()


def multiscale(name: str, levels: list[Level], affine: np.ndarray, spacing_xyz: np.ndarray, *,
               kind: str, method: str, channels: str | None = None,
               version: str = NGFF_VERSION) -> dict[str, Any]:
    """One ``multiscales`` entry in the layout of ``version`` (0.6, or 0.5 for old stores).

    Args:
        name: the image's name.
        levels: the pyramid, finest first.
        affine: 4x4 RAS affine of index ``(x, y, z)`` of level 0 (0.6 only; 0.5 cannot say it).
        spacing_xyz: level 0's voxel sizes (mm), the lengths of ``affine``'s index axes.
        kind: the downsampling (``"mean"``, ``"mode"``).
        method: the function that made the pyramid.
        channels: what a 4-D array's first axis holds when it is not time.
        version: the NGFF version to write.
    """
    ndim = len(levels[0].scale)
    axes = array_axes(ndim, channels)
    entry: dict[str, Any] = {"name": name, "axes": axes}
    if version == LEGACY_VERSION:
        entry["datasets"] = [{"path": lv.path, "coordinateTransformations": [
            {"type": "scale", "scale": list(lv.scale)},
            {"type": "translation", "translation": list(lv.translation)}]} for lv in levels]
    else:
        _check_writable(version)
        entry["coordinateSystems"] = [{"name": WORLD, "axes": world_axes(ndim, channels)},
                                      {"name": INTRINSIC, "axes": axes}]
        entry["datasets"] = [{"path": lv.path, "coordinateTransformations": [_to_intrinsic(lv)]}
                             for lv in levels]
        entry["coordinateTransformations"] = [{
            "type": "affine", "affine": intrinsic_to_world(affine, spacing_xyz, ndim),
            "input": {"name": INTRINSIC}, "output": {"name": WORLD}}]
    entry.update({"type": kind, "metadata": {"method": method}})
    return entry


def _to_intrinsic(level: Level) -> dict[str, Any]:
    ends = {"input": {"path": level.path}, "output": {"name": INTRINSIC}}
    scale = {"type": "scale", "scale": list(level.scale)}
    if not any(level.translation):  # the least expressive transform that is exact
        return scale | ends
    return {"type": "sequence", "transformations": [
        scale, {"type": "translation", "translation": list(level.translation)}]} | ends


def image_metadata(name: str, levels: list[Level], affine: np.ndarray, spacing_xyz: np.ndarray, *,
                   channels: str | None = None, version: str = NGFF_VERSION) -> dict[str, Any]:
    """The ``ome`` attributes of a volume's image group."""
    return {"version": version, "multiscales": [multiscale(
        name, levels, affine, spacing_xyz, kind="mean", method="voxelflow.store.downsample",
        channels=channels, version=version)]}


def label_metadata(name: str, levels: list[Level], affine: np.ndarray, spacing_xyz: np.ndarray,
                   colors: list[dict[str, Any]], properties: list[dict[str, Any]], *,
                   version: str = NGFF_VERSION) -> dict[str, Any]:
    """The ``ome`` attributes of a label image (``labels/<name>``): a multiscale image on the
    volume's grid, with the volume's world geometry, plus its ``image-label`` description.
    ``colors`` and ``properties`` are left out when empty (an all-background label), as the
    schema wants at least one entry in each."""
    image_label: dict[str, Any] = {"version": version}
    if colors:
        image_label["colors"] = colors
    if properties:
        image_label["properties"] = properties
    image_label["source"] = {"image": "../../"}
    return {"version": version,
            "multiscales": [multiscale(name, levels, affine, spacing_xyz, kind="mode",
                                       method="voxelflow.store.downsample_labels", version=version)],
            "image-label": image_label}


def labels_listing(names: list[str], version: str = NGFF_VERSION) -> dict[str, Any]:
    """The ``ome`` attributes of a volume's ``labels`` group."""
    return {"version": version, "labels": names}


def _check_writable(version: str) -> None:
    if version not in READABLE_VERSIONS:
        raise ValueError(f"cannot write OME-Zarr {version!r}; expected one of {READABLE_VERSIONS}")


# ----------------------------------------------------------------------------- reading


def version_of(attrs: dict[str, Any], where: str | os.PathLike = "image") -> str:
    """The NGFF version of a group's attributes.

    Raises:
        UnsupportedDataError: the version is missing or not one voxelflow reads.
    """
    found = attrs.get("ome", {}).get("version")
    if found not in READABLE_VERSIONS:
        raise UnsupportedDataError(str(where), f"OME-Zarr version {found!r}; voxelflow reads {READABLE_VERSIONS}")
    return found


def datasets(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The pyramid levels (``path`` and transforms), finest first, in either version."""
    return attrs["ome"]["multiscales"][0]["datasets"]


def level_scale(dataset: dict[str, Any]) -> list[float]:
    """A level's voxel size per array axis, from its transforms in either layout: 0.5's
    ``[scale, translation]`` list, 0.6's single ``scale`` or ``sequence`` of the two."""
    first = dataset["coordinateTransformations"][0]
    if first["type"] == "sequence":
        first = first["transformations"][0]
    if first["type"] != "scale":
        raise UnsupportedDataError(dataset.get("path", "?"), f"level transform of type {first['type']!r}; "
                                   "expected a scale, or a sequence of a scale and a translation")
    return [float(v) for v in first["scale"]]
