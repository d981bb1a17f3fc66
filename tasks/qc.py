"""The QC gallery as a flow step: the report planned in the flow, its volumes drawn in batches
on the flow's workers (a first report of 10^4 volumes is minutes of drawing), the index written,
and a Prefect artifact that links to it and shows its first volumes."""

from __future__ import annotations

import json
import os

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.artifacts import png_inline
from tasks.retry import RETRY
from voxelflow import location
from voxelflow.qc import draw_volumes, finish_report, plan_report

SHOWN = 4  # volumes the artifact shows (the report holds them all)
VOLUMES_PER_TASK = 64  # ~0.1-0.2 s a volume: a task of a few seconds to tens of seconds
MAX_TASKS = 64


@task(name="qc-draw", cache_policy=NO_CACHE, **RETRY)
def draw(store: str, jobs_json: str, size: int) -> list[dict]:
    """Draw a batch of the report's volumes (jobs travel as JSON text, like ingest's)."""
    return draw_volumes(store, json.loads(jobs_json), size, workers=max(1, len(os.sched_getaffinity(0))))


def gallery(store: str) -> str | None:
    """Bring ``STORE/qc/index.html`` up to date from inside a flow; returns its path, or None
    when it could not be written (the run's data is safe without it: a warning says why)."""
    log = get_run_logger()
    try:
        plan = plan_report(store)
        per_task = max(VOLUMES_PER_TASK, -(-len(plan.jobs) // MAX_TASKS))
        futures = [draw.submit(store, json.dumps(plan.jobs[i:i + per_task]), plan.size)
                   for i in range(0, len(plan.jobs), per_task)]
        html = finish_report(plan, [d for f in futures for d in f.result()])
    except Exception as exc:  # noqa: BLE001 - a report is a view of the data, never a reason to fail a run
        log.warning("QC gallery of %s not written: %s: %s", store, type(exc).__name__, exc)
        return None
    _publish(store, html)
    return str(html)


def _publish(store: str, html) -> None:
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
