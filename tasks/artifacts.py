"""Helpers for Prefect artifacts."""

from __future__ import annotations

import base64
from pathlib import Path

from voxelflow import location


def png_markdown(path: Path, title: str) -> str:
    """Markdown showing a PNG inline (a data URL, which the Prefect UI renders), with its path."""
    data = base64.b64encode(location.path(path).read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n\n`{path}`"
