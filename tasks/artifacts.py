"""Helpers for Prefect artifacts."""

from __future__ import annotations

import base64
from pathlib import Path

from voxelflow import location


def png_inline(path: Path, title: str) -> str:
    """A PNG as a Markdown image (a data URL, which the Prefect UI renders)."""
    data = base64.b64encode(location.path(path).read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{data})"


def png_markdown(path: Path, title: str) -> str:
    """Markdown showing a PNG inline under a heading, with its path."""
    return f"### {title}\n\n{png_inline(path, title)}\n\n`{path}`"
