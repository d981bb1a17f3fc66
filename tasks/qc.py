"""The QC gallery as a flow step: the report written into the store (only what changed drawn
again), and a Prefect artifact that links to it and shows its first volumes."""

from __future__ import annotations

import json
import os

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.artifacts import png_inline
from tasks.retry import RETRY
from voxelflow import location
from voxelflow.qc import write_report

SHOWN = 4  # volumes the artifact shows (the report holds them all)


def gallery(store: str) -> str | None:
    """A flow's QC step: the report's path, or None when it could not be written (the run's
    data is safe without it: a warning says why, the flow goes on)."""
    result = qc_report.submit(store).result(raise_on_failure=False)
    if isinstance(result, BaseException):
        get_run_logger().warning("QC gallery of %s not written: %s: %s", store, type(result).__name__, result)
        return None
    return result


@task(name="qc-report", cache_policy=NO_CACHE, **RETRY)
def qc_report(store: str) -> str:
    """Write ``STORE/qc/index.html``; returns its path."""
    html = write_report(store, workers=max(1, len(os.sched_getaffinity(0))))
    index = json.loads(location.read_bytes(location.path(html).parent / "index.json"))
    run, counts = index["run"], index["counts"]
    not_converted = sum(n for status, n in counts["files"].items() if status != "converted")
    get_run_logger().info("QC gallery %s: %d volumes (%d drawn, %d unchanged) in %.1f s", html, counts["volumes"],
                          run["rendered"], run["reused"], run["seconds"])
    link = html if location.is_url(store) else f"file://{os.path.abspath(html)}"
    lines = [f"### QC gallery\n\n[{html}]({link}): {counts['volumes']} volumes, {not_converted} files skipped or "
             f"failed (searchable, paged). This run drew {run['rendered']} and kept {run['reused']}.\n"]
    for v in index["volumes"][:SHOWN]:
        facts = f"{v['modality'] or '-'}, {' x '.join(map(str, v['shape']))} voxels, " \
                f"{' x '.join(f'{s:g}' for s in v['spacing'])} mm, {v['orientation']}"
        images = " ".join(png_inline(location.path(html).parent / p.split("?")[0], f"{v['volume_id']} {view}")
                          for view, p in v.get("images", {}).items())
        lines.append(f"**{v['volume_id']}** ({facts}){'; ' + '; '.join(v['warnings']) if v['warnings'] else ''}"
                     f"\n\n{images}\n")
    create_markdown_artifact(key="qc-gallery", markdown="\n".join(lines),
                             description=f"QC gallery of {store} (first {SHOWN} volumes; the whole report: {html})")
    return str(html)
