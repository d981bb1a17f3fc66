"""The infer flow: a registered model over all or selected volumes, results into the store."""

from __future__ import annotations

import contextlib

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.progress import RunProgress
from flows.runner import run_on_dask
from tasks.qc import gallery
from tasks.artifacts import png_markdown
from tasks.infer import infer_volumes
from models import infer


@flow(name="infer", description="Sliding-window inference; predictions written back next to the images")
def infer_flow(config: infer.InferConfig, gpu: bool = False, volumes_per_task: int = 4, qc: bool = True) -> dict:
    info = infer.model_info(config)
    todo, done = infer.plan(config, info)
    get_run_logger().info("model %s/%s: %d volumes to predict, %d already predicted", config.name, info["version"],
                          len(todo), len(done))
    annotate = dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext()
    with annotate:
        futures = [infer_volumes.submit(config, info, todo[i:i + volumes_per_task])
                   for i in range(0, len(todo), volumes_per_task)]
    progress = RunProgress(len(todo), f"predicting {len(todo)} volumes with {config.name}")
    rows, lesions = [], []
    for fut in futures:
        out = fut.result()
        rows += out["rows"]
        lesions += out["lesions"]
        progress.advance(volumes_per_task)
    progress.close()
    infer.write_catalog(config.store, rows, lesions)
    if rows:
        create_table_artifact(key=f"infer-{config.name}".lower().replace("_", "-"),
                              table=[{"volume_id": r["volume_id"], "prediction": r["prediction"],
                                      "probabilities": [round(p, 4) for p in r["probabilities"]]} for r in rows],
                              description=f"{config.name}/{info['version']}: {len(rows)} volumes, "
                                          f"{len(lesions)} lesions")
    qc = [r for r in rows if r["qc_image"]]
    if qc:
        create_markdown_artifact(key=f"explain-{config.name}".lower().replace("_", "-"),
                                 markdown="\n\n".join(png_markdown(r["qc_image"],
                                                                      f"Grad-CAM {r['volume_id']}: {r['prediction']}")
                                                        for r in qc[:6]))
    return {"model": config.name, "version": info["version"], "predicted": len(rows), "skipped": len(done),
            "lesions": len(lesions), **({"members": info["members"]} if "members" in info else {}),
            **({"qc_report": gallery(config.store)} if qc else {})}


def run_infer(config: infer.InferConfig, gpu: bool | None = None, **kwargs) -> dict:
    from flows.runtime import use_gpu

    return run_on_dask(infer_flow, config, gpu=use_gpu(gpu), **kwargs)
