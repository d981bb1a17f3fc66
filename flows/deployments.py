"""The deployments, defined once: ``deployment/prefect.yaml``. ``prefect deploy`` reads it for
work pools; ``voxelflow serve`` builds the same deployments from it (same names, entrypoints,
parameters and schedules) and runs them in one process, without work pools.

The file's ``{{ $NAME }}`` templates are filled from ``variables`` (the nightly configuration
file and the schedule's time zone), else from the environment, as ``prefect deploy`` fills them.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from voxelflow.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployment" / "prefect.yaml"
_TEMPLATE = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def declared(path: str | os.PathLike = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` entries of a prefect.yaml, templates not yet filled."""
    try:
        entries = yaml.safe_load(Path(path).read_text())["deployments"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"deployments file {path}: {type(exc).__name__}: {exc}") from exc
    return list(entries)


def fill(value: Any, variables: dict[str, str]) -> Any:
    """``value`` with every ``{{ $NAME }}`` replaced by ``variables[NAME]`` or ``$NAME``."""
    if isinstance(value, dict):
        return {k: fill(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name = match.group(1)
        found = variables.get(name, os.environ.get(name))
        if found is None:
            raise ConfigurationError(f"deployment/prefect.yaml needs ${name}; set it in the environment")
        return found

    return _TEMPLATE.sub(one, value)


def load_flow(entrypoint: str):
    """The flow an entrypoint (``flows/nightly.py:nightly_flow``) names, imported as a module
    of this repository (the runner starts each run from the same entrypoint)."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(Path(file).with_suffix("").as_posix().replace("/", "."))
    return getattr(module, name)


def runner_deployments(config_file: str | os.PathLike, timezone: str, cron: str | None = None,
                       path: str | os.PathLike = PREFECT_YAML) -> list:
    """The deployments of ``path`` for ``prefect.serve``: parameters filled with the nightly
    configuration ``config_file``, schedules in ``timezone`` (``cron`` replaces the file's)."""
    from prefect.schedules import Cron

    variables = {"VOXELFLOW_NIGHTLY_CONFIG": str(Path(config_file).resolve()), "VOXELFLOW_TIMEZONE": timezone,
                 "VOXELFLOW_REPO": str(REPO)}
    out = []
    for entry in declared(path):
        entry = fill(entry, variables)
        schedules = [Cron(cron or s["cron"], timezone=s.get("timezone") or timezone)
                     for s in entry.get("schedules") or []]
        out.append(load_flow(entry["entrypoint"]).to_deployment(
            name=entry["name"], description=entry.get("description"), tags=entry.get("tags") or [],
            parameters=entry.get("parameters") or {}, schedules=schedules))
    return out
