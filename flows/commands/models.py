"""The model commands: plan, train, infer, export-model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.commands.common import key_values, prefect_api
from voxelflow.errors import ConfigurationError, NotInStoreError


def cmd_plan(args: argparse.Namespace) -> int:
    """A training plan from the store's labelled volumes (or a preprocessed copy's grid) and
    the memory of this machine's training device (or ``--memory-gb``), saved in the store."""
    from rich.console import Console
    from rich.table import Table

    from models.config import TrainConfig, undot
    from models.plan import explicit_settings, make_plan, output_classes, plan_json
    from voxelflow import registry
    from voxelflow.fingerprint import fingerprint
    from voxelflow.store import store_id

    store_id(args.store)
    config = TrainConfig(task=args.task, **undot(key_values(args.set, "TrainConfig", TrainConfig.field_names())))
    fp = fingerprint(args.store, args.label_name, version=args.version)
    memory = (int(args.memory_gb * 2 ** 30), f"{args.memory_gb:g} GiB (--memory-gb)") if args.memory_gb else None
    plan = make_plan(fp, args.task, memory, base=config, fixed=explicit_settings(config),
                     num_classes=output_classes(fp, config))
    path = registry.save_plan(args.store, plan_json(plan))
    table = Table(title=f"plan {plan.plan_id()} ({args.task}, fingerprint {plan.fingerprint}, "
                        f"{len(fp.volumes)} labelled volumes)")
    for column in ("setting", "value", "why"):
        table.add_column(column)
    for row in plan.table():
        table.add_row(*(str(row[k]) for k in ("setting", "value", "why")))
    Console(width=160).print(table)
    print(f"saved as {path}")
    if args.version is None:
        print(f"preprocess with it: voxelflow preprocess {args.store} --plan {plan.plan_id()}")
    print("`voxelflow train` plans the settings it is not given by the same rules, for its own device")
    if args.json:
        Path(args.json).write_text(json.dumps(plan_json(plan), indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.run import TrainRun
    from models.config import TrainConfig, undot

    settings: dict = {"task": args.task}
    if args.config:
        settings |= json.loads(Path(args.config).read_text())
    settings |= undot(key_values(args.set, "TrainConfig", TrainConfig.field_names()))
    if args.no_plan:  # the defaults given explicitly: nothing left to plan
        from models.plan import PLANNED_FIELDS

        settings = {k: v for k, v in TrainConfig(task=args.task).flat().items() if k in PLANNED_FIELDS} | settings
    default = TrainRun.model_fields["augmentation"].default  # the training default (spatial only)
    augmentation = type(default)(**default.model_dump() | key_values(args.augment, "AugmentConfig",
                                                                      set(type(default).model_fields)))
    ranks = {"world_size": args.world_size, "folds": args.folds} | \
        ({"rank_timeout_s": args.rank_timeout} if args.rank_timeout else {})
    run = TrainRun(store=args.store, version=args.version, name=args.name, train=TrainConfig(**settings),
                   augment=not args.no_augment, augmentation=augmentation, **ranks)
    api = prefect_api()
    from flows.train import run_train

    summary = run_train(run, gpu=args.gpu, dask_address=args.dask_address, n_workers=args.workers,
                        api_url=api.api_url)
    for row in summary.get("table", []):  # cross-validation: each fold, then mean and sd
        print("  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if v != ""))
    t = summary["throughput"]
    ranks_note = f", {t['world_size']} ranks" if t["world_size"] > 1 else ""
    print(f"model {summary['name']}/{summary['version']}: {summary['epochs']} epochs on {summary['device']}{ranks_note}, "
          f"{t['samples_per_s']} samples/s, {summary['stopped']}; promoted: {summary['promoted']}")
    best = summary["validation"]
    from flows.terminal import named_metrics

    print(f"  validation (epoch {best.get('epoch', '-')}): {named_metrics(best)}")
    print(f"  test: {named_metrics(summary['test'])}")
    if summary.get("plan"):
        print(f"planned settings: plan {summary['plan']} (STORE/plans/{summary['plan']}.json)")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from models.infer import InferConfig

    if args.ensemble and args.model:
        raise ConfigurationError("--ensemble predicts with a cross-validated run's folds; --model names one version")
    config = InferConfig(store=args.store, name=args.name, version=args.model, split=args.split or None,
                         volumes=args.volume or None, ensemble=args.ensemble)
    api = prefect_api()
    from flows.infer import run_infer

    summary = run_infer(config, gpu=args.gpu, dask_address=args.dask_address, n_workers=args.workers,
                        api_url=api.api_url)
    members = f" (ensemble of {', '.join(summary['members'])})" if summary.get("members") else ""
    print(f"model {summary['model']}/{summary['version']}{members}: {summary['predicted']} volumes predicted, "
          f"{summary['skipped']} already done, {summary['lesions']} lesions in catalog/lesions.parquet")
    if args.export:
        from voxelflow import catalog
        from voxelflow.export import export_label

        rows = [r for r in catalog.read_table(args.store, "predictions").to_pylist()
                if r["model"] == summary["model"] and r["version"] == summary["version"] and r["label_name"]]
        for r in rows:
            export_label(args.store, r["volume_id"], r["label_name"], Path(args.export) / f"{r['volume_id']}_pred.nii.gz")
        print(f"exported {len(rows)} predictions to {args.export}")
    if args.dicom_seg:
        from voxelflow import catalog
        from voxelflow.export import export_dicom_seg

        rows = [r for r in catalog.read_table(args.store, "predictions").to_pylist()
                if r["model"] == summary["model"] and r["version"] == summary["version"] and r["label_name"]]
        written = 0
        for r in rows:
            try:
                export_dicom_seg(args.store, r["volume_id"], r["label_name"],
                                 Path(args.dicom_seg) / f"{r['volume_id']}_seg.dcm")
                written += 1
            except (FileNotFoundError, ValueError) as exc:
                print(f"  no DICOM-SEG for {r['volume_id']}: {exc}")
        print(f"wrote {written} DICOM-SEG files to {args.dicom_seg}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from models.export import export_model
    from voxelflow import registry

    version = args.model or (registry.current(args.store, args.name) or {}).get("version")
    if not version:
        raise NotInStoreError(f"no model {args.name!r} registered in {args.store}")
    results = export_model(registry.version_dir(args.store, args.name, version),
                           formats=tuple(args.format or ("torchscript", "onnx")))
    for fmt, r in results.items():
        print(f"{fmt}: {r['path']} (max |difference| to PyTorch {r['max_abs_diff']:.2e})")
    return 0
