"""Drawing one volume's planes: where the three orthogonal cuts lie in the voxel grid (from the
affine, RAS), the display window, and a panel with outlines or a heat map, in square
millimetres. Used by the QC report (:mod:`voxelflow.qc.report`) and Grad-CAM images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from voxelflow.geometry import voxel_sizes

CT_WINDOW = (40.0, 400.0)  # level, width (HU): soft tissue
OUTLINE_PX = 2  # outline width at display resolution: visible at 256 px, thin enough to see under it

# Outlines of label values (value 1 takes the first colour, ...) and of models' predictions
# (one colour per model, by sorted name) come from separate palettes, so that a ground truth
# and a prediction drawn on one plane never share a colour.
LABEL_COLOURS = [(46, 204, 64), (51, 153, 255), (255, 133, 27), (200, 90, 255), (57, 204, 204),
                 (1, 255, 112), (176, 120, 70), (160, 160, 40)]
MODEL_COLOURS = [(255, 220, 0), (255, 65, 54), (240, 18, 190), (127, 219, 255), (245, 245, 245),
                 (255, 160, 200)]

# Where each view's display axes point. ``rows``/``cols``: the RAS axis (0 x: L->R, 1 y: P->A,
# 2 z: I->S) along the image's rows (top to bottom) and columns (left to right), and the
# direction of travel along it (-1: towards L, P or I). ``edges``: the letters at the top,
# bottom, left and right of the image.
VIEWS = {
    "axial": {"normal": 2, "rows": (1, -1), "cols": (0, -1), "edges": ("A", "P", "R", "L")},
    "coronal": {"normal": 1, "rows": (2, -1), "cols": (0, -1), "edges": ("S", "I", "R", "L")},
    "sagittal": {"normal": 0, "rows": (2, -1), "cols": (1, -1), "edges": ("S", "I", "A", "P")},
}

# matplotlib's "inferno" at nine evenly spaced points (perceptually uniform, dark to light):
# high values of a map stand out in yellow on grey anatomy; low ones fade with their alpha.
_INFERNO = np.array([(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
                     (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)], np.float32) / 255


@dataclass(frozen=True)
class PlaneCut:
    """One orthogonal plane of a 3-D array ``(z, y, x)``, and how to turn it for display.

    Attributes:
        view: ``axial``, ``coronal`` or ``sagittal``.
        axis: the array axis held fixed.
        index: the position along ``axis``.
        transpose: whether the display rows are the later of the two remaining array axes.
        flip_rows, flip_cols: whether to reverse the display rows / columns.
        spacing: millimetres per display row and per display column.
    """

    view: str
    axis: int
    index: int
    transpose: bool
    flip_rows: bool
    flip_cols: bool
    spacing: tuple[float, float]

    def take(self, array: Any, lead: tuple[int, ...] = ()) -> np.ndarray:
        """The plane of ``array`` (a NumPy or lazy Zarr array; ``lead`` indexes leading axes
        such as time), turned for display. Slicing a Zarr array reads only the chunks the
        plane crosses."""
        index: list[Any] = [slice(None)] * 3
        index[self.axis] = self.index
        plane = np.asarray(array[tuple(lead) + tuple(index)])
        if self.transpose:
            plane = plane.T
        if self.flip_rows:
            plane = plane[::-1]
        if self.flip_cols:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)


def orthogonal_cuts(affine: np.ndarray, shape_zyx: Sequence[int],
                    centre_zyx: Sequence[int] | None = None) -> list[PlaneCut]:
    """The axial, coronal and sagittal planes through ``centre_zyx`` (default: the middle) of
    an array ``(z, y, x)`` with voxel-to-RAS ``affine`` of index ``(x, y, z)``.

    An oblique volume is cut along the array axes closest to each anatomical axis (what
    ``nibabel.orientations.io_orientation`` picks), without resampling.

    Args:
        affine: 4x4 RAS affine, index order ``(x, y, z)`` (as :func:`voxelflow.store.open_volume`
            gives it).
        shape_zyx: the spatial shape of the array.
        centre_zyx: the voxel the three planes go through.

    Returns:
        One :class:`PlaneCut` per view, in the order of :data:`VIEWS`.
    """
    from nibabel.orientations import io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)  # per index axis (x, y, z): RAS axis, +1/-1
    spacing_xyz = voxel_sizes(affine)
    # array axis a (z, y, x) is index axis 2 - a
    world = {int(ornt[2 - a, 0]): (a, int(ornt[2 - a, 1]), float(spacing_xyz[2 - a])) for a in range(3)}
    shape = [int(n) for n in shape_zyx[-3:]]
    centre = [n // 2 for n in shape] if centre_zyx is None else [int(c) for c in centre_zyx]
    cuts = []
    for view, spec in VIEWS.items():
        axis = world[spec["normal"]][0]
        row_axis, row_sign, row_mm = world[spec["rows"][0]]
        col_axis, col_sign, col_mm = world[spec["cols"][0]]
        cuts.append(PlaneCut(view=view, axis=axis, index=centre[axis], transpose=row_axis > col_axis,
                             flip_rows=row_sign != spec["rows"][1], flip_cols=col_sign != spec["cols"][1],
                             spacing=(row_mm, col_mm)))
    return cuts


def display_window(modality: str | None, samples: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(low, high)`` intensities mapped to black and white: CT at a soft-tissue window
    (W400/L40 HU), anything else between the 1st and 99th percentiles of ``samples``."""
    if (modality or "").upper() == "CT":
        level, width = CT_WINDOW
        return level - width / 2, level + width / 2
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples])
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, [1, 99]))
    return (low, high) if high > low else (low, low + 1.0)


def inferno(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of ``values`` in [0, 1] on the inferno colour map (``values.shape + (3,)``)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_INFERNO) - 1)
    low = np.minimum(v.astype(np.int64), len(_INFERNO) - 2)
    t = (v - low)[..., None]
    return _INFERNO[low] * (1 - t) + _INFERNO[low + 1] * t


def scale_for(shape_zyx: Sequence[int], affine: np.ndarray, size: int) -> float:
    """Pixels per millimetre at which the volume's longest extent fills ``size`` pixels (one
    scale for its three panels, so that they compare)."""
    extent = np.asarray(shape_zyx[-3:][::-1], dtype=np.float64) * voxel_sizes(affine)
    return size / float(max(extent.max(), 1e-6))


def _nearest(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """``plane`` resampled to ``height`` x ``width`` by nearest neighbour (label values kept)."""
    rows = np.minimum(((np.arange(height) + 0.5) * plane.shape[0] / height).astype(np.int64), plane.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * plane.shape[1] / width).astype(np.int64), plane.shape[1] - 1)
    return plane[np.ix_(rows, cols)]


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage  # 0.15 s of import that every flow importing the QC step would pay

    return mask & ~ndimage.binary_erosion(mask, iterations=OUTLINE_PX, border_value=0)


def panel(plane: np.ndarray, cut: PlaneCut, window: tuple[float, float], px_per_mm: float, size: int,
          outlines: Sequence[tuple[np.ndarray, dict[int, tuple[int, int, int]]]] = (),
          heat: np.ndarray | None = None, heat_alpha: float = 0.6):
    """One view as a ``size`` x ``size`` RGB image: anatomy in grey at its physical aspect,
    centred on black, with label outlines and a translucent heat map drawn over it.

    Args:
        plane: the image plane, turned for display (:meth:`PlaneCut.take`).
        cut: the cut it came from (its millimetres per row and column).
        window: intensities shown as black and white (:func:`display_window`).
        px_per_mm: display scale (:func:`scale_for`).
        size: edge of the square image.
        outlines: ``(label plane, {value: RGB})`` pairs, drawn in order, later ones on top;
            values without a colour are not drawn.
        heat: a map in [0, 1] on the plane's grid, drawn with inferno colours and an opacity
            of ``heat_alpha`` times its value (zero leaves the anatomy untouched).
        heat_alpha: opacity where the map is 1.

    Returns:
        A PIL RGB image.
    """
    from PIL import Image

    height = int(np.clip(round(plane.shape[0] * cut.spacing[0] * px_per_mm), 1, size))
    width = int(np.clip(round(plane.shape[1] * cut.spacing[1] * px_per_mm), 1, size))
    low, high = window
    grey = Image.fromarray(plane.astype(np.float32)).resize((width, height), Image.BILINEAR)
    grey = np.clip((np.asarray(grey) - low) / (high - low), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if heat is not None:
        h = Image.fromarray(np.asarray(heat, dtype=np.float32)).resize((width, height), Image.BILINEAR)
        h = np.clip(np.asarray(h), 0, 1)
        alpha = (heat_alpha * h)[..., None]
        rgb = rgb * (1 - alpha) + inferno(h) * alpha
    out = (rgb * 255 + 0.5).astype(np.uint8)
    for labels, colours in outlines:
        shown = _nearest(labels, height, width)
        for value, colour in colours.items():
            mask = shown == value
            if mask.any():
                out[_outline(mask)] = colour
    canvas = Image.new("RGB", (size, size))
    canvas.paste(Image.fromarray(out, "RGB"), ((size - width) // 2, (size - height) // 2))
    return canvas
