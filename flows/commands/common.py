"""What the commands share: the Prefect API they report to, and KEY=VALUE settings."""

from __future__ import annotations

import json
import sys

from voxelflow.errors import ConfigurationError


def prefect_api():
    from flows.runtime import ensure_prefect_api

    api = ensure_prefect_api()
    print(f"Prefect API: {api.api_url}" + (" (started a local server)" if api.started_here else ""),
          file=sys.stderr)
    return api


def key_values(items: list[str] | None, what: str, known: set[str]) -> dict:
    """``KEY=VALUE`` options for the settings ``known`` of ``what`` as a dict; values are JSON
    (numbers, lists, true/false/null) or else bare strings (``positive_class=no_lesion``)."""
    out: dict = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if key not in known:
            raise ConfigurationError(f"unknown {what} setting {key!r} in {item!r}; "
                                     f"known: {', '.join(sorted(k for k in known if '.' not in k))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
