"""The QC report of a store: the catalog read once, each volume's three planes drawn (again
only when what they show changed), and the index and page written into ``STORE/qc/``."""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from voxelflow import location
from voxelflow.errors import NotInStoreError, StoreError
from voxelflow.qc.page import PAGE
from voxelflow.qc.planes import (
    LABEL_COLOURS, MODEL_COLOURS, VIEWS, display_window, orthogonal_cuts, panel, scale_for,
)
from voxelflow.query import queries
from voxelflow.store import Volume, open_label, open_volume

REPORT_FORMAT = "voxelflow-qc/1"
# Part of every render key: bump it when the drawing changes, so the next report redraws all.
RENDER_VERSION = 1


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
    return {name: table.to_pylist() for name, table in queries(store, sql).items()}


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


@dataclass
class ReportPlan:
    """What a report run will write: every volume's entry (those whose images are current keep
    them) and the drawing jobs of the others; :func:`draw_volumes` does the jobs (anywhere:
    they are plain JSON-able dicts), :func:`finish_report` writes the index."""

    store: str
    size: int
    started: float
    entries: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    drawn_before: dict[str, dict[str, Any]]
    legend: dict[str, dict[str, str]]
    file_counts: dict[str, int]
    files: list[dict[str, Any]]


def plan_report(store: str | os.PathLike, *, size: int = 256, force: bool = False) -> ReportPlan:
    """Read the catalog and the last report; decide what must be drawn.

    Raises:
        SettingError: ``store`` has no catalog.
        ValueError: ``size`` out of range.
    """
    if size < 16:
        raise ValueError(f"QC report of {store}: size >= 16 expected, got {size}")
    started = time.perf_counter()
    qc = location.path(store) / "qc"
    cat = _catalog(store)  # first: on a folder that is not a store, fail before writing into it
    labels, predictions = _by_volume(cat["labels"]), _by_volume(cat["predictions"])
    classes = _by_volume(cat["classes"])
    splits = {r["volume_id"]: r["split"] for r in cat["splits"]}
    models = sorted({r["model"] for r in cat["predictions"] if r["label_name"]})
    before = _previous(qc)
    model_colour = _model_colours(models, before.get("legend", {}).get("models", {}))
    drawn = {v["volume_id"]: v for v in before.get("volumes", [])}  # what the last report drew
    previous = {} if force else drawn
    label_values: set[int] = set()

    entries, jobs = [], []
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
            jobs.append({"volume_id": vid, "levels": row.get("levels"), "modality": row.get("modality"),
                         "render_key": key, "overlays": [asdict(o) for o in overlays]})
        entries.append(entry)
    legend = {"labels": {str(v): _hex(LABEL_COLOURS[(v - 1) % len(LABEL_COLOURS)]) for v in sorted(label_values)},
              "models": {m: _hex(c) for m, c in model_colour.items()}}
    return ReportPlan(store=str(store), size=size, started=started, entries=entries, jobs=jobs, drawn_before=drawn,
                      legend=legend, file_counts={r["status"]: int(r["n"]) for r in cat["file_counts"]},
                      files=[{"source": r["source"], "path": r["path"], "status": r["status"], "reason": r["reason"]}
                             for r in cat["files"]])


def draw_volumes(store: str | os.PathLike, jobs: Sequence[dict[str, Any]], size: int = 256,
                 workers: int = 1) -> list[dict[str, Any]]:
    """Draw the volumes of ``jobs`` (from :func:`plan_report`) into ``STORE/qc/img/``; returns
    ``[{"volume_id", "images", "notes"}]``. A volume that cannot be read gets a note saying
    why, not an error: the report shows it. ``workers``: volumes drawn at once (threads:
    reading and compressing release the GIL)."""
    if workers < 1:
        raise ValueError(f"QC report of {store}: workers >= 1 expected, got {workers}")
    images_dir = location.path(store) / "qc" / "img"
    location.makedirs(images_dir)

    def draw(job: dict[str, Any]) -> dict[str, Any]:
        overlays = [_Overlay(name=o["name"], key=o["key"], values=tuple(o["values"]), model=o["model"],
                             colour=tuple(o["colour"]) if o["colour"] else None) for o in job["overlays"]]
        try:
            names, notes = _render_volume(store, job, overlays, size, images_dir)
        except (NotInStoreError, StoreError) as exc:
            names, notes = {}, [f"cannot be read: {exc}"]
        # the render key in the URL: a browser never shows a redrawn image from its cache
        return {"volume_id": job["volume_id"], "notes": notes,
                "images": {view: f"img/{name}?k={job['render_key']}" for view, name in names.items()}}

    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(draw, jobs))
    return [draw(job) for job in jobs]


def finish_report(plan: ReportPlan, drawn: Sequence[dict[str, Any]], *, page_size: int = 50) -> Path:
    """Write the index and the page with the drawn volumes' images; remove images nothing shows
    any more. Returns the path of ``index.html``.

    Raises:
        StoreError: the report cannot be written.
        ValueError: ``page_size`` out of range.
    """
    if page_size < 1:
        raise ValueError(f"QC report of {plan.store}: page_size >= 1 expected, got {page_size}")
    qc = location.path(plan.store) / "qc"
    by_id = {d["volume_id"]: d for d in drawn}
    for entry in plan.entries:
        if entry["volume_id"] in by_id:
            entry["images"], entry["notes"] = by_id[entry["volume_id"]]["images"], by_id[entry["volume_id"]]["notes"]
    # images nothing shows any more: of volumes gone from the catalog, or no longer drawn
    current = {e["volume_id"]: {n.split("?")[0] for n in e["images"].values()} for e in plan.entries}
    removed = 0
    for vid, old in plan.drawn_before.items():
        for name in {n.split("?")[0] for n in (old.get("images") or {}).values()} - current.get(vid, set()):
            location.path(qc / name).unlink(missing_ok=True)
        removed += vid not in current
    index = {
        "format": REPORT_FORMAT,
        "store": plan.store,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size": plan.size, "page_size": page_size,
        "views": {v: list(spec["edges"]) for v, spec in VIEWS.items()},
        "legend": plan.legend,
        "counts": {"volumes": len(plan.entries), "files": plan.file_counts},
        "run": {"rendered": len(plan.jobs), "reused": len(plan.entries) - len(plan.jobs), "removed": removed,
                "seconds": round(time.perf_counter() - plan.started, 3)},
        "volumes": plan.entries,
        "files": plan.files,
    }
    text = json.dumps(index, default=str, separators=(",", ":"))
    try:
        location.makedirs(qc)
        location.write_bytes(qc / "index.json", text.encode())
        location.write_bytes(qc / "index.js", f"window.QC_INDEX = {text};\n".encode())
        location.write_bytes(qc / "index.html", PAGE.encode())
    except OSError as exc:
        raise StoreError(f"cannot write the QC report into {qc}: {exc}") from exc
    return qc / "index.html"


def write_report(store: str | os.PathLike, *, size: int = 256, page_size: int = 50, workers: int = 1,
                 force: bool = False) -> Path:
    """Write (or bring up to date) the QC report ``STORE/qc/index.html`` in this process
    (:func:`plan_report`, :func:`draw_volumes`, :func:`finish_report`; a flow spreads the
    drawing over its workers instead).

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
    plan = plan_report(store, size=size, force=force)
    return finish_report(plan, draw_volumes(store, plan.jobs, size, workers), page_size=page_size)
