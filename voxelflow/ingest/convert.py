"""Converting: a batch of jobs becomes volumes in the store and catalog rows, a chunk of
files at a time; bad input never raises, each file gets its row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from voxelflow.deid import pseudonym
from voxelflow.errors import InvalidInputError, NotAnImageError
from voxelflow.geometry import orientation_code
from voxelflow.ingest.plan import job_records, read_job_tables
from voxelflow.sorted_parquet import release_arrow_memory
from voxelflow.io.dicom import not_part_of_a_volume, plan_series, stack_volume
from voxelflow.io.nifti import read_nifti
from voxelflow.store import write_volume


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _file_row(rec: dict, status: str, reason: str | None = None, volume_id: str | None = None) -> dict:
    return {"source": rec["source"], "path": rec["path"], "status": status,
            "reason": reason, "volume_id": volume_id, "digest": rec.get("digest")}


def _volume_row(volume_id: str, info, affine: np.ndarray, *, kind: str, first: dict, stack: str,
                files: list[dict], attributes: str, warnings: list[str]) -> dict:
    return {
        "volume_id": volume_id,
        "patient_id": first.get("patient"), "study_id": first.get("study"),
        "series_id": first.get("series"), "stack": stack, "kind": kind,
        "modality": first.get("modality"), "shape": list(info.shape),
        "spacing": list(info.spacing), "orientation": orientation_code(affine),
        "dtype": info.dtype, "levels": info.levels,
        "affine": [float(v) for v in np.asarray(affine).ravel()],
        "n_files": len(files), "source_files": [f["path"] for f in files],
        "digest": info.digest, "attributes": attributes, "warnings": warnings,
        "ingested_at": _now(),
    }


def convert_dicom_series(store: str, key: bytes, series: str, records: list[dict],
                         chunk: int = 64, keep_localizers: bool = False,
                         resample_tilt: bool = False) -> tuple[list[dict], list[dict]]:
    """Plan and write the volumes of one DICOM series. Returns ``(volume_rows, file_rows)``.

    Bad input never raises: each file gets its row (``failed`` with the reason).
    """
    file_rows: list[dict] = []
    volume_rows: list[dict] = []
    # The same SOP instance twice (copies, several encodings of one image): keep the first.
    seen: dict[str, str] = {}
    unique: list[dict] = []
    for rec in sorted(records, key=lambda r: (r["source"], r["path"])):
        inst = rec["instance"]
        if inst and inst in seen:
            file_rows.append(_file_row(rec, "skipped", f"duplicate of {seen[inst]} (same SOPInstanceUID)"))
            continue
        if inst:
            seen[inst] = rec["path"]
        reason = not_part_of_a_volume(rec, keep_localizers)
        if reason:
            file_rows.append(_file_row(rec, "skipped", reason))
            continue
        unique.append(rec)
    if not unique:
        return [], file_rows
    left_out: list[tuple[dict, InvalidInputError]] = []  # images not part of any stack while the others are
    try:
        plans = plan_series(series, unique, left_out)
    except NotAnImageError as exc:
        return [], file_rows + [_file_row(r, "skipped", str(exc)) for r in unique]
    except InvalidInputError as exc:
        return [], file_rows + [_file_row(r, "failed", str(exc)) for r in unique]
    for rec, error in left_out:
        file_rows.append(_file_row(rec, "skipped" if isinstance(error, NotAnImageError) else "failed", str(error)))
    for plan in plans:
        volume_id = pseudonym(key, "volume", f"{series}|{plan.label}").lower()
        try:
            data, affine, extra = stack_volume(plan, resample_tilt)
            info = write_volume(store, volume_id, data, affine, chunk=chunk, time_step=plan.time_step,
                                channels=plan.channels, attributes={
                "kind": "dicom", "modality": plan.files[0]["modality"],
                "warnings": plan.warnings, "stack": plan.label, **extra})
        except InvalidInputError as exc:
            reason = f"series {series}" + (f" [{plan.label}]" if plan.label else "") + f": {exc}"
            file_rows.extend(_file_row(r, "failed", reason) for r in _distinct_files(plan.files))
            continue
        files = _distinct_files(plan.files)  # a multi-frame file is one file, not one per frame
        volume_rows.append(_volume_row(
            volume_id, info, affine, kind="dicom", first=plan.files[0], stack=plan.label,
            files=files, attributes=json.dumps(json.loads(plan.files[0]["attributes"] or "{}") | extra, sort_keys=True),
            warnings=plan.warnings))
        file_rows.extend(_file_row(r, "converted", None, volume_id) for r in files)
    # a multi-frame file whose frames went into several volumes (echoes, stacks) is one row:
    # converted (into the first volume) if any of its volumes was written
    by_path: dict[tuple, dict] = {}
    for row in file_rows:
        k = (row["source"], row["path"])
        if k not in by_path or (by_path[k]["status"] != "converted" and row["status"] == "converted"):
            by_path[k] = row
    return volume_rows, list(by_path.values())


def _distinct_files(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        if (r["source"], r["path"]) not in seen:
            seen.add((r["source"], r["path"]))
            out.append(r)
    return out


def convert_nifti_file(store: str, key: bytes, rec: dict, chunk: int = 64) -> tuple[list[dict], list[dict]]:
    """Write one NIfTI file as a volume. Returns ``(volume_rows, file_rows)``."""
    try:
        vol = read_nifti(rec["local"], rec["path"])
    except InvalidInputError as exc:
        return [], [_file_row(rec, "failed", exc.reason)]
    source_name = Path(rec["source"].rstrip("/")).name
    volume_id = pseudonym(key, "volume", f"nifti|{source_name}|{rec['path']}").lower()
    data = np.transpose(vol.data, tuple(range(vol.data.ndim))[::-1])  # (x,y,z[,t]) -> ([t,]z,y,x)
    data = np.ascontiguousarray(data)
    info = write_volume(store, volume_id, data, vol.affine, time_step=vol.time_step, chunk=chunk,
                        attributes={"kind": "nifti", "modality": None, "warnings": vol.warnings,
                                    "stack": ""})
    first = {"patient": None, "study": None, "series": None, "modality": None}
    row = _volume_row(volume_id, info, vol.affine, kind="nifti", first=first, stack="",
                      files=[rec], attributes="{}", warnings=vol.warnings)
    return [row], [_file_row(rec, "converted", None, volume_id)]


# Files converted between two hand-overs of rows: what a conversion task holds at once,
# whatever the size of its batch (a larger series is converted whole).
CONVERT_CHUNK = 1024


def convert_jobs(store: str, key: bytes, jobs: list[dict], chunk: int = 64,
                 keep_localizers: bool = False, resample_tilt: bool = False) -> Iterator[dict[str, list[dict]]]:
    """Run a batch of jobs, :data:`CONVERT_CHUNK` files at a time: yields ``{"volumes": [...],
    "files": [...]}`` rows per chunk of jobs, reading only that chunk's scan records."""
    group: list[dict] = []
    count = 0
    for job in [*jobs, None]:
        if group and (job is None or count + job["n"] > CONVERT_CHUNK):
            yield _convert_group(store, key, group, chunk, keep_localizers, resample_tilt)
            group, count = [], 0
        if job is not None:
            group.append(job)
            count += job["n"]


def _convert_group(store: str, key: bytes, jobs: list[dict], chunk: int, keep_localizers: bool,
                   resample_tilt: bool) -> dict:
    volumes: list[dict] = []
    files: list[dict] = []
    tables = read_job_tables(jobs)  # only these jobs' rows
    for job in jobs:
        records = job_records(job, tables=tables)
        if job["kind"] == "dicom":
            v, f = convert_dicom_series(store, key, job["series"], records, chunk, keep_localizers, resample_tilt)
        else:
            v, f = convert_nifti_file(store, key, records[0], chunk)
        volumes.extend(v)
        files.extend(f)
    del tables
    release_arrow_memory()
    return {"volumes": volumes, "files": files}


