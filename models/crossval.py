"""k-fold cross-validation: the folds of one run, recorded together in the registry.

Each fold (``TrainRun.fold``) is an ordinary registered version, trained on the train split's
patients outside the fold and validated on those inside (``voxelflow.labels.make_folds``); the
group (``registry.register_group``) lists the versions, the metrics of every fold and their mean
and standard deviation, and is what ensemble inference (``models.ensemble``) reads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models.run import TrainRun
from voxelflow import registry


def group_id(run: TrainRun) -> str:
    """The id of ``run``'s cross-validation group: a digest of what its folds share and the data."""
    return "cv-" + registry.version_id(run.group_identity(), registry.data_snapshot(run.store, run.version))


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def fold_table(summaries: list[dict]) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """One row per fold (its version, validation monitor and test metrics), then the mean and
    the sample standard deviation over the folds, and those two as ``{"mean": ..., "sd": ...}``."""
    rows = []
    for k, s in enumerate(summaries):
        rows.append({"fold": str(k), "version": s["version"], "validation": float(s["validation"]["monitor"]),
                     **{f"test {m}": v for m, v in _scalars(s["test"]).items()}})
    keys = [k for k in rows[0] if k not in ("fold", "version")]
    mean, sd = {}, {}
    for k in keys:  # over the folds that have the metric (a fold without lesions has no distance)
        values = np.array([r.get(k, math.nan) for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        mean[k] = float(values.mean()) if len(values) else math.nan
        sd[k] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return rows + [{"fold": "mean", "version": "", **mean}, {"fold": "sd", "version": "", **sd}], \
        {"mean": mean, "sd": sd}


def record(run: TrainRun, summaries: list[dict]) -> dict[str, Any]:
    """Register the group of ``run``'s trained folds (``summaries`` in fold order) and return
    the run's summary: the group id as its version, the folds' mean metrics, the table."""
    table, stats = fold_table(summaries)
    name = summaries[0]["name"]
    gid = group_id(run)
    registry.register_group(run.store, name, gid, members=[s["version"] for s in summaries],
                            record={"folds": run.folds, "table": table, "mean": stats["mean"], "sd": stats["sd"]})
    mean = stats["mean"]
    return {"name": name, "version": gid, "group": gid, "folds": summaries, "table": table,
            "promoted": any(s["promoted"] for s in summaries), "device": summaries[0]["device"],
            "validation": {"monitor": mean["validation"]},
            "test": {k.removeprefix("test "): v for k, v in mean.items() if k.startswith("test ")},
            "epochs": max(s["epochs"] for s in summaries), "stopped": ",".join(sorted({s["stopped"] for s in summaries})),
            # a fold's (the mean over folds): folds run in parallel or one after another
            "throughput": {"world_size": run.world_size,
                           "samples_per_s": round(float(np.mean([s["throughput"]["samples_per_s"] for s in summaries])), 2),
                           "rank_samples_per_s": [], "data_wait_share":
                               max(s["throughput"]["data_wait_share"] for s in summaries)}}
