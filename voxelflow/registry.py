"""The model registry inside the store.

    STORE/models/<name>/<version>/   checkpoint.pt (last epoch, to resume), weights.pt (best),
                                     model.json (config, data snapshot, code version, metrics)
    STORE/models/<name>/current.json the version in use; moves only when a new version beats it
    STORE/models/<name>/groups/<id>.json  a cross-validated run: its fold versions (the members of
                                     its ensemble), their metrics, mean and sd
    STORE/plans/<id>.json            a training plan and the fingerprint it was derived from
                                     (``models.plan``); a version's ``config.plan`` names its plan

A version's id is a digest of its training configuration and the data snapshot it saw, so a
killed training run resumes in the same folder. Promotion compares validation metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from voxelflow import location
from voxelflow.errors import NotInStoreError


def models_dir(store: str | os.PathLike, name: str) -> Path:
    return location.path(store) / "models" / name


def data_snapshot(store: str | os.PathLike, preprocessed: str | None = None) -> dict[str, Any]:
    """Digests of the catalog tables a model was trained on (volumes, labels, classes, split)
    and of the preprocessed copy's catalog."""
    store = location.path(store)
    parts = {}
    for name in ("volumes", "labels", "classes", "splits"):
        parts[name] = _table_digest(store / "catalog" / f"{name}.parquet")
    if preprocessed:
        parts["preprocessed"] = _table_digest(store / "preprocessed" / preprocessed / "catalog" / "preprocessed.parquet")
    catalog_digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"catalog_digest": catalog_digest, "tables": parts, "preprocessed_version": preprocessed}


VOLATILE_COLUMNS = ("ingested_at", "created_at")  # when, not what: a re-run that changes nothing keeps the digest


def _table_digest(path: Path) -> str | None:
    """Digest of a catalog table's content (rows in key order, timestamps left out)."""
    if not path.exists():
        return None
    table = location.read_parquet(path)
    table = table.drop_columns([c for c in VOLATILE_COLUMNS if c in table.column_names])
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def code_version() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("voxelflow")
    except PackageNotFoundError:
        package = None
    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": package, "commit": commit}


def version_id(config: dict[str, Any], snapshot: dict[str, Any]) -> str:
    blob = json.dumps({"config": config, "data": snapshot["catalog_digest"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def version_dir(store: str | os.PathLike, name: str, version: str) -> Path:
    return models_dir(store, name) / version


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    location.write_bytes(path, json.dumps(data, indent=2, default=str).encode())


def register(store: str | os.PathLike, name: str, version: str, *, config: dict[str, Any],
             snapshot: dict[str, Any], metrics: dict[str, Any], monitor: str) -> Path:
    """Record a trained version (its folder already holds ``weights.pt``)."""
    folder = version_dir(store, name, version)
    if not (folder / "weights.pt").exists():
        raise NotInStoreError(f"model {name}/{version} has no weights.pt in {folder}")
    _write_json_atomic(folder / "model.json", {
        "name": name, "version": version, "config": config, "data": snapshot, "code": code_version(),
        "metrics": metrics, "monitor": monitor, "registered_at": datetime.now(timezone.utc).isoformat()})
    return folder


def current(store: str | os.PathLike, name: str) -> dict[str, Any] | None:
    path = models_dir(store, name) / "current.json"
    return json.loads(path.read_text()) if path.exists() else None


def promote_if_better(store: str | os.PathLike, name: str, version: str) -> bool:
    """Point ``current`` at ``version`` if its validation ``monitor`` metric beats the current
    version's (higher is better), or if there is none. Returns whether it moved."""
    info = json.loads((version_dir(store, name, version) / "model.json").read_text())
    value = float(info["metrics"]["validation"][info["monitor"]])
    now = current(store, name)
    if now is not None and now["version"] != version and float(now["value"]) >= value:
        return False
    _write_json_atomic(models_dir(store, name) / "current.json",
                       {"version": version, "monitor": info["monitor"], "value": value,
                        "previous": now["version"] if now else None,
                        "promoted_at": datetime.now(timezone.utc).isoformat()})
    return True


def list_versions(store: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    root = models_dir(store, name)
    out = []
    for path in sorted(root.glob("*/model.json")) if root.exists() else []:
        out.append(json.loads(path.read_text()))
    return out


def register_group(store: str | os.PathLike, name: str, group: str, *, members: list[str],
                   record: dict[str, Any]) -> dict[str, Any]:
    """Record a cross-validated run: ``members`` (its registered fold versions, in fold order)
    and ``record`` (its per-fold metrics, mean and sd)."""
    for version in members:
        if not (version_dir(store, name, version) / "model.json").exists():
            raise NotInStoreError(f"model {name}/{version} (a fold of {group}) is not registered")
    out = {"name": name, "group": group, "members": members, **record,
           "registered_at": datetime.now(timezone.utc).isoformat()}
    _write_json_atomic(models_dir(store, name) / "groups" / f"{group}.json", out)
    return out


def group(store: str | os.PathLike, name: str, group_id: str | None = None) -> dict[str, Any]:
    """A cross-validated run's record: ``group_id``'s, or the newest one registered."""
    root = models_dir(store, name) / "groups"
    paths = sorted(root.glob("*.json")) if root.exists() else []
    records = [json.loads(p.read_text()) for p in paths]
    if group_id is not None:
        records = [r for r in records if r["group"] == group_id]
    if not records:
        which = f"cross-validated run {group_id!r}" if group_id else "cross-validated run"
        raise NotInStoreError(f"model {name!r} in {store} has no {which} (train with folds first)")
    return max(records, key=lambda r: r["registered_at"])


def plans_dir(store: str | os.PathLike) -> Path:
    return location.path(store) / "plans"


def save_plan(store: str | os.PathLike, plan: dict[str, Any]) -> Path:
    """Record a plan (a dict with its ``plan_id``, as ``models.plan.plan_json`` gives it); the
    same plan saved again is the same file."""
    path = plans_dir(store) / f"{plan['plan_id']}.json"
    _write_json_atomic(path, plan | {"saved_at": datetime.now(timezone.utc).isoformat()})
    return path


def load_plan(store: str | os.PathLike, plan_id: str | None = None) -> dict[str, Any]:
    """A saved plan: ``plan_id``'s, or the newest one saved.

    Raises:
        NotInStoreError: no such plan in the store.
    """
    root = plans_dir(store)
    paths = sorted(root.glob("*.json")) if root.exists() else []
    plans = [json.loads(p.read_text()) for p in paths if plan_id is None or p.stem == plan_id]
    if not plans:
        which = f"plan {plan_id!r}" if plan_id else "plan"
        raise NotInStoreError(f"{store} has no {which} (make one with `voxelflow plan {store}`)")
    return max(plans, key=lambda p: p["saved_at"])
