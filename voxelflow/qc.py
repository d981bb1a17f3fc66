"""A QC gallery of a store: a static HTML report inside it, one card per volume.

Layout::

    STORE/qc/
      index.html                 the page: inline CSS and vanilla JavaScript, nothing fetched
                                 from outside (opens from disk or any static file server)
      index.json                 the report's data: every volume (catalog facts, image paths,
                                 render keys) and every file not converted, with its reason
      index.js                   the same data as ``window.QC_INDEX = {...};``; a page opened
                                 from disk (``file://``) may not fetch JSON, it may load a script
      img/<volume_id>-<view>.png three orthogonal mid-planes per volume (axial, coronal,
                                 sagittal), ``size`` x ``size`` px each

The page builds the DOM of one page of cards at a time from the index (``page_size`` volumes),
so a store of 10^4 volumes loads a few MB of text and at most ``3 * page_size`` images; the
search box filters volumes and files by id, modality, warnings, labels, models and reasons.

Each panel is drawn as a radiologist reads it, whatever the voxel order on disk (the affine,
RAS, decides): axial seen from the feet (patient right on the image's left, anterior up),
coronal seen from the front (right on the left, superior up), sagittal seen from the patient's
left (anterior on the left, superior up); pixels are square millimetres at one scale for the
three panels of a volume. CT is shown at a soft-tissue window (W400/L40 HU), anything else
between the 1st and 99th percentiles of the three planes. Labels (``catalog/labels.parquet``)
are drawn as outlines, one colour per label value; each model's predicted labels
(``prediction-<model>``) as outlines in one colour per model.

Rendering reads only the three planes (a slice of the lazy Zarr array reads only the chunks it
crosses), from the coarsest pyramid level still at least ``size`` voxels across. A volume is
drawn again only when what its images show changed: its content digest, its labels' digests,
its predictions, or the drawing itself (:data:`RENDER_VERSION`, ``size``).

    >>> write_report("store")           # doctest: +SKIP
    PosixPath('store/qc/index.html')
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from voxelflow import location
from voxelflow.errors import NotInStoreError, StoreError
from voxelflow.geometry import voxel_sizes
from voxelflow.query import query
from voxelflow.store import Volume, open_label, open_volume

REPORT_FORMAT = "voxelflow-qc/1"
# Part of every render key: bump it when the drawing changes, so the next report redraws all.
RENDER_VERSION = 1
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


# ----------------------------------------------------------------------------- planes


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


# ----------------------------------------------------------------------------- catalog


def _catalog(store: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """The catalog columns the report shows (only those: a volume row's source-file list alone
    can be hundreds of paths), and the files that were not converted."""
    sql = {
        "volumes": "SELECT volume_id, kind, modality, shape, spacing, orientation, dtype, levels, n_files, digest, "
                   "warnings FROM volumes ORDER BY volume_id",
        "labels": 'SELECT DISTINCT volume_id, name, digest, "values" FROM labels ORDER BY volume_id, name',
        "predictions": "SELECT volume_id, model, version, task, label_name, prediction, qc_image, created_at "
                       "FROM predictions ORDER BY volume_id, model",
        "classes": "SELECT volume_id, label FROM classes ORDER BY volume_id, label",
        "splits": "SELECT volume_id, split FROM splits",
        "files": "SELECT source, path, status, reason, volume_id FROM files WHERE status <> 'converted' "
                 "ORDER BY status, reason, source, path",
        "file_counts": "SELECT status, count(*) AS n FROM files GROUP BY status ORDER BY status",
    }
    return {name: query(store, q).to_pylist() for name, q in sql.items()}


def _by_volume(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["volume_id"], []).append(r)
    return out


@dataclass(frozen=True)
class _Overlay:
    """A label map to outline on a volume's planes: ground truth, one colour per value, or a
    model's prediction, one colour for all its foreground values."""

    name: str  # the label's name in the store
    key: str  # what identifies its content (a digest, or a prediction's version and time)
    values: tuple[int, ...] = ()  # a ground truth's foreground values
    model: str | None = None  # the model that predicted it
    colour: tuple[int, int, int] | None = None  # the model's colour

    def colours(self, plane: np.ndarray) -> dict[int, tuple[int, int, int]]:
        """The colour of each value of ``plane`` to outline."""
        if self.model is None:
            return {v: LABEL_COLOURS[(v - 1) % len(LABEL_COLOURS)] for v in self.values}
        return {int(v): self.colour for v in np.unique(plane) if v > 0}


def _overlays(labels: list[dict], predictions: list[dict], model_colour: dict[str, tuple[int, int, int]]
              ) -> list[_Overlay]:
    out, seen = [], set()
    for r in labels:  # one label name may come from several sources with one content
        if r["name"] not in seen:
            seen.add(r["name"])
            out.append(_Overlay(r["name"], str(r["digest"]), values=tuple(int(v) for v in r["values"] or [] if v > 0)))
    for r in predictions:
        if r["label_name"] and r["label_name"] not in seen:
            seen.add(r["label_name"])
            out.append(_Overlay(r["label_name"], f"{r['version']}@{r['created_at']}", model=r["model"],
                                colour=model_colour[r["model"]]))
    return out


# ----------------------------------------------------------------------------- rendering


def _render_key(row: dict, overlays: list[_Overlay], size: int) -> str:
    text = json.dumps([RENDER_VERSION, size, row["digest"], [(o.name, o.key, o.colour) for o in overlays]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _display_level(store: str | os.PathLike, volume_id: str, levels: int, size: int) -> tuple[Volume, Volume]:
    """Level 0 and the coarsest pyramid level still at least ``size`` voxels along its longest
    axis: its planes hold what ``size`` pixels can show, at a fraction of level 0's reads."""
    base = chosen = open_volume(store, volume_id)
    for level in range(1, max(int(levels or 1), 1)):
        vol = open_volume(store, volume_id, level)
        if max(vol.array.shape[-3:]) < size:
            break
        chosen = vol
    return base, chosen


def _render_volume(store: str | os.PathLike, row: dict[str, Any], overlays: Sequence[_Overlay], size: int,
                  folder: Path) -> tuple[dict[str, str], list[str]]:
    """Draw one volume's three planes into ``folder`` as ``<volume_id>-<view>.png``.

    Labels are read at full resolution (a majority-vote pyramid level drops lesions a few
    voxels wide) and only along the three planes.

    Returns:
        ``({view: file name}, notes)``; no images, and a note saying why, for a colour (RGB)
        volume.

    Raises:
        NotInStoreError, StoreError: the volume cannot be read.
    """
    vid = row["volume_id"]
    base, vol = _display_level(store, vid, row.get("levels") or 1, size)
    if vol.channels:
        return {}, [f"{vol.channels} colour volume: not drawn"]
    notes = []
    lead: tuple[int, ...] = ()
    if vol.array.ndim == 4:
        lead = (0,)
        notes.append(f"{vol.array.shape[0]} time points: the first is shown")
    shape = vol.array.shape[-3:]
    cuts = orthogonal_cuts(vol.affine, shape)
    planes = [c.take(vol.array, lead) for c in cuts]
    window = display_window(row.get("modality"), planes)
    px_per_mm = scale_for(shape, vol.affine, size)
    label_planes: list[list[tuple[np.ndarray, dict]]] = [[] for _ in cuts]
    for overlay in overlays:
        try:
            label = open_label(store, vid, overlay.name)
        except FileNotFoundError:
            notes.append(f"label {overlay.name} is in the catalog but not in the store")
            continue
        for k, cut in enumerate(orthogonal_cuts(base.affine, label.shape)):
            plane = cut.take(label)
            label_planes[k].append((plane, overlay.colours(plane)))
    images = {}
    for cut, plane, outlines in zip(cuts, planes, label_planes):
        name = f"{vid}-{cut.view}.png"
        location.save_png(panel(plane, cut, window, px_per_mm, size, outlines), folder / name)
        images[cut.view] = name
    return images, notes


# ----------------------------------------------------------------------------- report


def _previous(qc: Path) -> dict[str, Any]:
    """The previous report's index (empty when it is missing or unreadable: then everything is
    drawn again, which is slow but never wrong)."""
    try:
        index = json.loads(location.read_bytes(qc / "index.json"))
    except (OSError, ValueError):
        return {}
    return index if index.get("format") == REPORT_FORMAT else {}


def _model_colours(models: Sequence[str], before: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """A colour per model that keeps the colour it had in the previous report (``before``:
    model -> hex), so that a new model redraws only the volumes it predicted; a new model
    takes the first colour no current model has (or, all taken, the least used)."""
    palette = {_hex(c): c for c in MODEL_COLOURS}
    out = {m: palette[before[m]] for m in models if before.get(m) in palette}
    for m in sorted(set(models) - set(out)):
        used = list(out.values())
        out[m] = min(MODEL_COLOURS, key=lambda c: (used.count(c), MODEL_COLOURS.index(c)))
    return dict(sorted(out.items()))


def _hex(colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % colour


def _relative_qc_image(path: str | None, store: str | os.PathLike, qc: Path) -> str | None:
    """A Grad-CAM image's path relative to the report, when it lies inside the store."""
    if not path or location.is_url(store):
        return None
    try:
        Path(path).resolve().relative_to(Path(store).resolve())
    except ValueError:
        return None
    return Path(os.path.relpath(Path(path).resolve(), Path(qc).resolve())).as_posix()


def write_report(store: str | os.PathLike, *, size: int = 256, page_size: int = 50, workers: int = 1,
                 force: bool = False) -> Path:
    """Write (or bring up to date) the QC report ``STORE/qc/index.html``.

    Volumes whose images show what they showed last time (same content digest, label digests,
    predictions, ``size``) keep their images; the others are drawn again, and the images of
    volumes no longer in the catalog are removed. ``index.json`` records what this run did
    under ``run`` (``rendered``, ``reused``, ``removed``, ``seconds``).

    Args:
        store: the store (a local path or an fsspec URL).
        size: edge, in pixels, of each view's square image.
        page_size: volume cards (and file rows) per page of the report.
        workers: volumes drawn at once (threads: reading and compressing release the GIL).
        force: draw every volume again.

    Returns:
        The path of ``index.html``.

    Raises:
        SettingError: ``store`` has no catalog.
        StoreError: the report cannot be written.
        ValueError: ``size``, ``page_size`` or ``workers`` out of range.
    """
    if size < 16 or page_size < 1 or workers < 1:
        raise ValueError(f"QC report of {store}: size >= 16, page_size >= 1 and workers >= 1 expected, "
                         f"got size={size}, page_size={page_size}, workers={workers}")
    started = time.perf_counter()
    root = location.path(store)
    qc = root / "qc"
    images_dir = qc / "img"
    cat = _catalog(store)  # first: on a folder that is not a store, fail before writing into it
    location.makedirs(images_dir)
    labels, predictions = _by_volume(cat["labels"]), _by_volume(cat["predictions"])
    classes = _by_volume(cat["classes"])
    splits = {r["volume_id"]: r["split"] for r in cat["splits"]}
    models = sorted({r["model"] for r in cat["predictions"] if r["label_name"]})
    before = _previous(qc)
    model_colour = _model_colours(models, before.get("legend", {}).get("models", {}))
    drawn = {v["volume_id"]: v for v in before.get("volumes", [])}  # what the last report drew
    previous = {} if force else drawn
    label_values: set[int] = set()

    entries, todo = [], []
    for row in cat["volumes"]:
        vid = row["volume_id"]
        overlays = _overlays(labels.get(vid, []), predictions.get(vid, []), model_colour)
        key = _render_key(row, overlays, size)
        label_values.update(v for o in overlays for v in o.values)
        entry = {
            "volume_id": vid, "kind": row["kind"], "modality": row["modality"], "shape": row["shape"],
            "spacing": [round(float(s), 4) for s in row["spacing"] or []], "orientation": row["orientation"],
            "dtype": row["dtype"], "n_files": row["n_files"], "warnings": row["warnings"] or [],
            "classes": [r["label"] for r in classes.get(vid, [])], "split": splits.get(vid),
            "labels": [{"name": o.name, "values": list(o.values)} for o in overlays if o.model is None],
            "predictions": [{"model": r["model"], "version": r["version"], "task": r["task"],
                             "prediction": r["prediction"], "label_name": r["label_name"],
                             "qc_image": _relative_qc_image(r["qc_image"], store, qc)}
                            for r in predictions.get(vid, [])],
            "render_key": key, "images": {}, "notes": [],
        }
        old = previous.get(vid)
        if old and old.get("render_key") == key and old.get("images") is not None and \
                all((qc / n.split("?")[0]).exists() for n in old["images"].values()):
            entry["images"], entry["notes"] = old["images"], old.get("notes", [])
        else:
            todo.append((entry, row, overlays))
        entries.append(entry)

    def draw(job) -> None:
        entry, row, overlays = job
        try:
            names, notes = _render_volume(store, row, overlays, size, images_dir)
        except (NotInStoreError, StoreError) as exc:
            names, notes = {}, [f"cannot be read: {exc}"]
        # the render key in the URL: a browser never shows a redrawn image from its cache
        entry["images"] = {view: f"img/{name}?k={entry['render_key']}" for view, name in names.items()}
        entry["notes"] = notes

    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(draw, todo))
    else:
        for job in todo:
            draw(job)

    # images nothing shows any more: of volumes gone from the catalog, or no longer drawn
    current = {e["volume_id"]: {n.split("?")[0] for n in e["images"].values()} for e in entries}
    removed = 0
    for vid, old in drawn.items():
        for name in {n.split("?")[0] for n in (old.get("images") or {}).values()} - current.get(vid, set()):
            location.path(qc / name).unlink(missing_ok=True)
        removed += vid not in current

    counts = {r["status"]: int(r["n"]) for r in cat["file_counts"]}
    index = {
        "format": REPORT_FORMAT,
        "store": str(store),
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size": size, "page_size": page_size,
        "views": {v: list(spec["edges"]) for v, spec in VIEWS.items()},
        "legend": {"labels": {str(v): _hex(LABEL_COLOURS[(v - 1) % len(LABEL_COLOURS)])
                              for v in sorted(label_values)},
                   "models": {m: _hex(c) for m, c in model_colour.items()}},
        "counts": {"volumes": len(entries), "files": counts},
        "run": {"rendered": len(todo), "reused": len(entries) - len(todo), "removed": removed,
                "seconds": round(time.perf_counter() - started, 3)},
        "volumes": entries,
        "files": [{"source": r["source"], "path": r["path"], "status": r["status"], "reason": r["reason"]}
                  for r in cat["files"]],
    }
    text = json.dumps(index, default=str, separators=(",", ":"))
    try:
        location.write_bytes(qc / "index.json", text.encode())
        location.write_bytes(qc / "index.js", f"window.QC_INDEX = {text};\n".encode())
        location.write_bytes(qc / "index.html", _PAGE.encode())
    except OSError as exc:
        raise StoreError(f"cannot write the QC report into {qc}: {exc}") from exc
    return qc / "index.html"


# The page: plain DOM built with textContent (paths and reasons come from archives and may hold
# anything, so nothing from the index is ever parsed as HTML); state in the URL hash, so a
# search or a page can be linked to.
_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>voxelflow QC</title>
<style>
  :root { --bg: #121416; --card: #1c1f23; --line: #2e3238; --text: #e4e6e8; --dim: #9aa0a6; --warn: #f0b429;
          --bad: #ff6b6b; --accent: #4ea1ff; }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--text); font: 14px/1.45 system-ui, -apple-system,
         "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
  header { position: sticky; top: 0; z-index: 2; background: #17191c; border-bottom: 1px solid var(--line);
           padding: 10px 20px; display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: center; }
  h1 { font-size: 18px; margin: 0; font-weight: 600; }
  h2 { font-size: 16px; margin: 24px 0 10px; font-weight: 600; }
  .dim { color: var(--dim); }
  #search { flex: 1 1 320px; max-width: 520px; padding: 7px 10px; border-radius: 6px; border: 1px solid var(--line);
            background: #0d0f11; color: var(--text); font-size: 14px; }
  main { padding: 0 20px 40px; }
  .counts span { margin-right: 14px; }
  .legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; }
  .swatch { display: inline-block; width: 14px; height: 4px; margin-right: 5px; vertical-align: middle;
            border-radius: 1px; }
  .pager { display: flex; align-items: center; gap: 8px; margin: 8px 0; }
  .pager button { background: #25292e; color: var(--text); border: 1px solid var(--line); border-radius: 5px;
                  padding: 4px 10px; cursor: pointer; }
  .pager button:disabled { opacity: .35; cursor: default; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px;
          margin: 10px 0; display: flex; flex-wrap: wrap; gap: 14px; }
  .views { display: flex; gap: 8px; flex-wrap: wrap; }
  figure { margin: 0; position: relative; width: 256px; }
  figure img { display: block; width: 100%; height: auto; background: #000; border-radius: 3px;
               image-rendering: auto; }
  figcaption { font-size: 12px; color: var(--dim); text-align: center; margin-top: 2px; }
  .edge { position: absolute; font: 600 11px/1 monospace; color: #ffd76a; text-shadow: 0 0 2px #000; }
  .edge.t { top: 3px; left: 50%; transform: translateX(-50%); }
  .edge.b { bottom: 21px; left: 50%; transform: translateX(-50%); }
  .edge.l { left: 4px; top: 46%; } .edge.r { right: 4px; top: 46%; }
  .facts { flex: 1 1 300px; min-width: 280px; }
  .facts h3 { margin: 0 0 6px; font: 600 14px/1.3 ui-monospace, monospace; word-break: break-all; }
  .facts table { border-collapse: collapse; font-size: 13px; }
  .facts td { padding: 1px 10px 1px 0; vertical-align: top; }
  .facts td:first-child { color: var(--dim); white-space: nowrap; }
  .warn { color: var(--warn); } .bad { color: var(--bad); }
  .note { color: var(--dim); font-style: italic; }
  table.files { border-collapse: collapse; width: 100%; font-size: 13px; }
  table.files th, table.files td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
                                   vertical-align: top; }
  table.files td.path { font-family: ui-monospace, monospace; word-break: break-all; }
  .status-failed { color: var(--bad); } .status-skipped { color: var(--warn); }
  a { color: var(--accent); }
  .empty { color: var(--dim); padding: 12px 0; }
</style>
</head>
<body>
<header>
  <h1>voxelflow QC</h1>
  <input id="search" type="search" placeholder="Search: volume id, modality, warning, label, model, file, reason"
         autocomplete="off" spellcheck="false">
  <div class="counts dim" id="counts"></div>
  <div class="legend" id="legend"></div>
</header>
<main>
  <h2>Volumes <span class="dim" id="volumes-count"></span></h2>
  <div class="pager" id="volumes-pager"></div>
  <div id="volumes"></div>
  <div class="pager" id="volumes-pager-bottom"></div>
  <h2>Files not converted <span class="dim" id="files-count"></span></h2>
  <div class="pager" id="files-pager"></div>
  <div id="files"></div>
</main>
<noscript><p>This report needs JavaScript (inline, nothing is fetched from outside).</p></noscript>
<script src="index.js"></script>
<script>
"use strict";
const D = window.QC_INDEX;
const PAGE = D.page_size;
const state = { q: "", vp: 1, fp: 1 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

// what the search box matches: every word typed must occur somewhere in an entry's text
for (const v of D.volumes) {
  v._text = [v.volume_id, v.modality, v.kind, v.orientation, v.split, ...(v.classes || []), ...(v.warnings || []),
             ...(v.notes || []), ...(v.labels || []).map(l => l.name),
             ...(v.predictions || []).flatMap(p => [p.model, p.prediction])].filter(Boolean).join(" ").toLowerCase();
}
for (const f of D.files) f._text = [f.source, f.path, f.status, f.reason].filter(Boolean).join(" ").toLowerCase();

function matches(items) {
  const words = state.q.toLowerCase().split(/\s+/).filter(Boolean);
  return words.length ? items.filter(it => words.every(w => it._text.includes(w))) : items;
}

function pager(box, page, pages, key) {
  box.replaceChildren();
  const go = (p) => { state[key] = p; render(true); };
  const b = (label, cls, p, off) => { const x = el("button", { class: cls, type: "button", text: label });
    x.disabled = off; x.addEventListener("click", () => go(p)); return x; };
  box.append(b("« first", "first", 1, page <= 1), b("‹ prev", "prev", page - 1, page <= 1),
             el("span", { class: "page dim", text: `page ${page} of ${pages}` }),
             b("next ›", "next", page + 1, page >= pages), b("last »", "last", pages, page >= pages));
}

function fact(table, name, value, cls) {
  if (value == null || value === "" || (Array.isArray(value) && !value.length)) return;
  table.append(el("tr", {}, el("td", { text: name }), el("td", { class: cls || "", text: String(value) })));
}

function card(v) {
  const views = el("div", { class: "views" });
  for (const [view, edges] of Object.entries(D.views)) {
    const src = v.images && v.images[view];
    if (!src) continue;
    const fig = el("figure", {}, el("img", { src, alt: `${view} ${v.volume_id}`, width: D.size, height: D.size,
                                             loading: "lazy", class: "view" }));
    ["t", "b", "l", "r"].forEach((side, i) => fig.append(el("span", { class: "edge " + side, text: edges[i] })));
    fig.append(el("figcaption", { text: view }));
    views.append(fig);
  }
  const t = el("table");
  fact(t, "modality", v.modality || "—");
  fact(t, "kind", v.kind);
  fact(t, "shape", (v.shape || []).join(" × ") + "  (" + ((v.shape || []).length === 4 ? "t, " : "") + "z, y, x)");
  fact(t, "spacing", (v.spacing || []).map(s => +s.toFixed(3)).join(" × ") + " mm (x, y, z)");
  fact(t, "orientation", v.orientation);
  fact(t, "dtype", v.dtype);
  fact(t, "source files", v.n_files);
  fact(t, "class", (v.classes || []).join(", "));
  fact(t, "split", v.split);
  for (const l of v.labels || []) {
    const td = el("td");
    td.append(el("span", { text: l.name + " " }));
    for (const value of l.values) {
      td.append(el("span", { class: "swatch", style: `background:${D.legend.labels[String(value)] || "#888"}` }),
                el("span", { text: String(value) + " " }));
    }
    t.append(el("tr", {}, el("td", { text: "label" }), td));
  }
  for (const p of v.predictions || []) {
    const td = el("td");
    if (p.label_name) td.append(el("span", { class: "swatch", style: `background:${D.legend.models[p.model]}` }));
    // a segmentation's prediction is its outline; a classifier's is a class
    td.append(el("span", { text: `${p.model} ${p.version || ""}` + (p.label_name ? "" : `: ${p.prediction ?? "—"}`) }));
    if (p.qc_image) td.append(" ", el("a", { href: p.qc_image, target: "_blank", text: "Grad-CAM" }));
    t.append(el("tr", {}, el("td", { text: "prediction" }), td));
  }
  for (const w of v.warnings || []) fact(t, "warning", w, "warn");
  for (const n of v.notes || []) fact(t, "note", n, n.startsWith("cannot") ? "bad" : "note");
  const facts = el("div", { class: "facts" }, el("h3", { text: v.volume_id }), t);
  return el("div", { class: "card", "data-volume": v.volume_id }, views, facts);
}

function fileRows(files) {
  const table = el("table", { class: "files" });
  table.append(el("tr", {}, el("th", { text: "status" }), el("th", { text: "file" }), el("th", { text: "reason" }),
                  el("th", { text: "source" })));
  for (const f of files) {
    table.append(el("tr", { class: "file" }, el("td", { class: "status-" + f.status, text: f.status }),
                    el("td", { class: "path", text: f.path }), el("td", { text: f.reason || "" }),
                    el("td", { class: "path dim", text: f.source })));
  }
  return table;
}

function render(scroll) {
  const vols = matches(D.volumes), files = matches(D.files);
  const vpages = Math.max(1, Math.ceil(vols.length / PAGE)), fpages = Math.max(1, Math.ceil(files.length / PAGE));
  state.vp = Math.min(Math.max(1, state.vp), vpages); state.fp = Math.min(Math.max(1, state.fp), fpages);
  const shown = vols.slice((state.vp - 1) * PAGE, state.vp * PAGE);
  $("volumes").replaceChildren(...(shown.length ? shown.map(card) : [el("div", { class: "empty", text: "no volume matches" })]));
  $("volumes-count").textContent = state.q ? `${vols.length} of ${D.volumes.length} match` : `${vols.length}`;
  pager($("volumes-pager"), state.vp, vpages, "vp");
  pager($("volumes-pager-bottom"), state.vp, vpages, "vp");
  const fshown = files.slice((state.fp - 1) * PAGE, state.fp * PAGE);
  $("files").replaceChildren(fshown.length ? fileRows(fshown) : el("div", { class: "empty", text: "none" }));
  $("files-count").textContent = state.q ? `${files.length} of ${D.files.length} match` : `${files.length}`;
  pager($("files-pager"), state.fp, fpages, "fp");
  const hash = new URLSearchParams({ q: state.q, vp: state.vp, fp: state.fp }).toString();
  if (location.hash.slice(1) !== hash) history.replaceState(null, "", "#" + hash);
  if (scroll === true) window.scrollTo(0, 0);
}

const c = D.counts.files;
$("counts").append(...[`${D.counts.volumes} volumes`, `${c.converted || 0} files converted`,
                       `${c.skipped || 0} skipped`, `${c.failed || 0} failed`, `generated ${D.generated_at}`]
                   .map(t => el("span", { text: t })));
const legend = $("legend");
for (const [value, colour] of Object.entries(D.legend.labels))
  legend.append(el("span", {}, el("span", { class: "swatch", style: `background:${colour}` }), `label ${value}`));
for (const [model, colour] of Object.entries(D.legend.models))
  legend.append(el("span", {}, el("span", { class: "swatch", style: `background:${colour}` }), `model ${model}`));

const initial = new URLSearchParams(location.hash.slice(1));
state.q = initial.get("q") || ""; state.vp = +initial.get("vp") || 1; state.fp = +initial.get("fp") || 1;
$("search").value = state.q;
let timer = null;
$("search").addEventListener("input", (e) => {
  clearTimeout(timer);
  timer = setTimeout(() => { state.q = e.target.value; state.vp = 1; state.fp = 1; render(); }, 120);
});
render();
</script>
</body>
</html>
"""
