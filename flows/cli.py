"""``voxelflow`` command line: ingest, labels, preprocess, plan, train, infer, export, demo, server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from voxelflow import location
from voxelflow.errors import ConfigurationError, NotInStoreError, SourceError, VoxelflowError


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"voxelflow ingest -> {summary['store']}")
    table.add_column("files", justify="right")
    table.add_column("converted", justify="right")
    table.add_column("skipped", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("volumes written", justify="right")
    table.add_column("unchanged files", justify="right")
    table.add_column("gone", justify="right")
    table.add_row(*(str(summary.get(k, 0)) for k in ("files", "converted", "skipped", "failed", "volumes",
                                                     "unchanged", "gone")))
    console.print(table)
    for row in summary["top_reasons"]:
        print(f"  {row['files']:>5} x {row['status']}: {row['reason']}")
    print(f"Run in the Prefect UI: {summary['ui_url']}")


def _prefect_api():
    from flows.runtime import ensure_prefect_api

    api = ensure_prefect_api()
    print(f"Prefect API: {api.api_url}" + (" (started a local server)" if api.started_here else ""),
          file=sys.stderr)
    return api


def cmd_ingest(args: argparse.Namespace) -> int:
    missing = [s for s in args.sources if not location.is_url(s) and not Path(s).exists()]
    if missing:
        raise SourceError(f"source(s) not found: {', '.join(missing)}")
    from voxelflow.ingest import IngestConfig, prepare_store

    config = IngestConfig(sources=[str(s) for s in args.sources], store=str(args.store),
                          scratch=args.scratch, secret_file=args.secret_file,
                          batch_size=args.batch_size, chunk=args.chunk,
                          keep_localizers=getattr(args, "keep_localizers", False),
                          resample_tilt=getattr(args, "resample_tilt", False))
    prepare_store(config.store, config.secret_file)  # fail fast: unwritable store, missing key
    api = _prefect_api()
    from flows.ingest import run_ingest
    from flows.runtime import small_input

    # a study converts in this process sooner than a Dask cluster starts; in a task a thread,
    # since each task costs a few API calls
    files = small_input(config.sources) if args.workers is None else None
    if files is not None and config.batch_size is None:
        config = config.model_copy(update={"batch_size": max(1, -(-files // len(os.sched_getaffinity(0))))})
    summary = run_ingest(config, dask_address=args.dask_address, n_workers=args.workers,
                         api_url=api.api_url, in_process=files is not None)
    _print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from voxelflow.export import export_nifti
    from voxelflow.store import store_id

    store_id(args.store)  # a clear error when it is not a store
    paths = export_nifti(args.store, args.outdir, args.volume or None)
    print(f"exported {len(paths)} volumes to {args.outdir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole path on sample data: real files PyPI packages ship plus a synthetic labelled
    archive -> ingest -> labels -> preprocess -> augment -> train -> infer -> NIfTI export."""
    from voxelflow.demo import build_demo_archive
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    work = Path(args.workdir)
    store = str(work / "store")
    if Path(store).exists():
        import shutil

        shutil.rmtree(store)  # a fresh demo store each time
    sources = build_demo_archive(work / "sources")
    synthetic = build_synthetic_archive(work / "synthetic", SynthConfig(patients=args.patients, mr_patients=2,
                                                                                 positive_fraction=0.4))
    sources.append(str(synthetic / "images"))
    print("demo sources:", *sources, sep="\n  ")
    dask = [*(["--dask-address", args.dask_address] if args.dask_address else []),
            *(["--workers", str(args.workers)] if args.workers else [])]
    _command("ingest", *sources, "--store", store, "--batch-size", "64", *dask)
    _command("labels", store, "--segmentations", synthetic / "labels" / "segmentations.csv",
             "--classes", synthetic / "labels" / "labels.csv", "--split", "0.6,0.2,0.2")
    version = _preprocess(_parse("preprocess", store, "--labelled-only", *dask))
    _command("augment", store, "--version", version, "--copies", "2", *dask)
    if args.train_epochs:
        settings = {
            # the liver, lesions included (LiTS's liver task: the lesions are the classifier's),
            # is one piece: keep its largest component. 40 steps an epoch: with 20 the U-Net
            # took the spleen for liver in a few test volumes (README: the demo's figures)
            # patch, batch and channels given: sized for 2 CPU cores, not planned for the memory
            "segmentation": ["steps_per_epoch=40", "patch_size=[32,64,64]", "batch_size=2", "channels=[16,32,64,128]",
                             'label_map={"2": 1}', "keep_largest=[1]"],
            # lesion / no lesion as detection: patch targets from the lesion label (value 2),
            # a volume is positive when one of its windows is. A 2-D slice classifier (patches
            # one slice deep) with a stride-2 stem: a 3-D one sees too few patches in the demo's
            # time to learn the lesions (README: "The classifier is a slice classifier").
            "classification": ["steps_per_epoch=100", "batch_size=32", "patch_size=[1,64,64]", "stem_stride=2",
                               "positive_class=lesion", "positive_label=2"],
        }
        # the classifier's on-the-fly augmentation: flips only (models.run.FLIPS_ONLY; README)
        from models.run import FLIPS_ONLY

        augment = {"segmentation": [], "classification": [f"{k}={json.dumps(v)}" for k, v in FLIPS_ONLY.items()]}
        for task in ("segmentation", "classification"):
            sets = [f"epochs={args.train_epochs}", "early_stopping=8", *settings[task]]
            _command("train", store, "--version", version, "--task", task, *dask,
                     *[a for kv in sets for a in ("--set", kv)], *[a for kv in augment[task] for a in ("--augment", kv)])
            _command("infer", store, "--name", task, *dask,
                     *(["--export", work / "predictions"] if task == "segmentation" else []))
    _command("export", store, work / "nifti")
    return 0


def _parse(*argv) -> argparse.Namespace:
    """A command line as the user would type it, parsed by the same parser (and defaults)."""
    return build_parser().parse_args([str(a) for a in argv])


def _command(*argv) -> int:
    """Run one voxelflow command (``_command("export", store, outdir)``) as ``main`` would."""
    args = _parse(*argv)
    return args.func(args)


def _preprocess(args: argparse.Namespace) -> str:
    from voxelflow.preprocess import PreprocessConfig
    from voxelflow.store import store_id

    store_id(args.store)
    planned: dict = {}
    if args.plan:
        from voxelflow import registry

        plan = registry.load_plan(args.store, None if args.plan == "latest" else args.plan)
        planned = {"spacing": tuple(plan["spacing"]), "mr_normalization": plan["mr_normalization"],
                   **({"ct_window": tuple(plan["ct_window"])} if plan.get("ct_window") else {})}
        print(f"plan {plan['plan_id']}: spacing {list(planned['spacing'])} mm"
              + (f", CT window {list(planned['ct_window'])}" if "ct_window" in planned else ""))
    spacing = tuple(float(v) for v in args.spacing.split(",")) if args.spacing else None
    config = PreprocessConfig(store=args.store, volumes=args.volume or None, interpolation=args.interpolation,
                              crop_foreground=not args.no_crop, labelled_only=args.labelled_only,
                              **(planned | ({"spacing": spacing} if spacing else {})))
    api = _prefect_api()
    from flows.preprocess import run_preprocess

    summary = run_preprocess(config, dask_address=args.dask_address, n_workers=args.workers, api_url=api.api_url)
    print(f"preprocessed copy {summary['output']} (version {summary['version']}, spacing {summary['spacing']} mm): "
          f"{summary['processed']} processed, {summary['unchanged']} unchanged, {summary['failed']} failed")
    for vid, reason in summary["failures"]:
        print(f"  failed {vid}: {reason}")
    return summary["version"]


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
    config = TrainConfig(task=args.task, **undot(_key_values(args.set, "TrainConfig", TrainConfig.field_names())))
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


def cmd_catalog(args: argparse.Namespace) -> int:
    """SQL over the store's catalog tables: a table on the terminal, or a CSV / Parquet file."""
    from voxelflow.query import query

    result = query(args.store, args.sql)
    if args.csv or args.parquet:
        if args.csv:
            import pyarrow.csv as pacsv

            pacsv.write_csv(_flat_columns(result), args.csv)
        if args.parquet:
            location.write_parquet(result, args.parquet)
        print(f"{result.num_rows} rows written to {', '.join(p for p in (args.csv, args.parquet) if p)}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for name in result.column_names:
        table.add_column(name)
    for row in result.slice(0, args.max_rows).to_pylist():
        table.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(width=max(120, Console().width)).print(table)
    more = result.num_rows - min(result.num_rows, args.max_rows)
    print(f"{result.num_rows} rows" + (f" ({more} not shown: --max-rows, or --csv / --parquet)" if more else ""))
    return 0


def _flat_columns(table):
    """CSV has no lists: list and struct columns become their JSON text."""
    import pyarrow as pa

    columns = []
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_nested(column.type):
            column = pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()],
                              pa.string())
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def cmd_qc(args: argparse.Namespace) -> int:
    """The store's QC gallery, brought up to date (no Prefect: a file written into the store)."""
    import json as _json

    from voxelflow import location as _location
    from voxelflow.qc import write_report

    html = write_report(args.store, workers=args.workers or max(1, len(os.sched_getaffinity(0))), force=args.force)
    index = _json.loads(_location.read_bytes(_location.path(html).parent / "index.json"))
    run = index["run"]
    print(f"QC gallery: {html} ({index['counts']['volumes']} volumes; {run['rendered']} drawn, "
          f"{run['reused']} unchanged, in {run['seconds']:.1f} s)")
    if not _location.is_url(args.store):
        print(f"open file://{os.path.abspath(html)}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    _preprocess(args)
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from voxelflow.augment import OfflineConfig

    config = OfflineConfig(store=args.store, version=args.version, copies=args.copies, seed=args.seed,
                           split=args.split or None)
    api = _prefect_api()
    from flows.augment import run_augment

    summary = run_augment(config, dask_address=args.dask_address, n_workers=args.workers, api_url=api.api_url)
    print(f"augmented copies in {summary['output']}: {summary['made']} made, {summary['existing']} already there")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.run import TrainRun
    from models.config import TrainConfig, undot

    settings: dict = {"task": args.task}
    if args.config:
        settings |= json.loads(Path(args.config).read_text())
    settings |= undot(_key_values(args.set, "TrainConfig", TrainConfig.field_names()))
    if args.no_plan:  # the defaults given explicitly: nothing left to plan
        from models.plan import PLANNED_FIELDS

        settings = {k: v for k, v in TrainConfig(task=args.task).flat().items() if k in PLANNED_FIELDS} | settings
    default = TrainRun.model_fields["augmentation"].default  # the training default (spatial only)
    augmentation = type(default)(**default.model_dump() | _key_values(args.augment, "AugmentConfig",
                                                                      set(type(default).model_fields)))
    ranks = {"world_size": args.world_size, "folds": args.folds} | \
        ({"rank_timeout_s": args.rank_timeout} if args.rank_timeout else {})
    run = TrainRun(store=args.store, version=args.version, name=args.name, train=TrainConfig(**settings),
                   augment=not args.no_augment, augmentation=augmentation, **ranks)
    api = _prefect_api()
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


def _key_values(items: list[str] | None, what: str, known: set[str]) -> dict:
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


def cmd_infer(args: argparse.Namespace) -> int:
    from models.infer import InferConfig

    if args.ensemble and args.model:
        raise ConfigurationError("--ensemble predicts with a cross-validated run's folds; --model names one version")
    config = InferConfig(store=args.store, name=args.name, version=args.model, split=args.split or None,
                         volumes=args.volume or None, ensemble=args.ensemble)
    api = _prefect_api()
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


def cmd_synth(args: argparse.Namespace) -> int:
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    out = build_synthetic_archive(args.outdir, SynthConfig(patients=args.patients, mr_patients=args.mr_patients,
                                                           seed=args.seed))
    print(f"synthetic archive in {out}: images/ (ingest this), labels/labels.csv, labels/segmentations.csv")
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from voxelflow import labels
    from voxelflow.ingest import store_key

    key = store_key(args.store, args.secret_file)
    problems = 0
    if args.segmentations:
        rows, errors = labels.import_segmentations(args.store, args.segmentations, key)
        by_mapping: dict[str, int] = {}
        for r in rows:
            by_mapping[r["mapping"]] = by_mapping.get(r["mapping"], 0) + 1
        print(f"segmentations attached: {len(rows)} {by_mapping}; not attached: {len(errors)}")
        for r in rows:
            for w in r["warnings"]:
                print(f"  warning {r['source']}: {w}")
        for e in errors:
            print(f"  error {e['segmentation']}: {e['reason']}")
        problems += len(errors)
    if args.classes:
        rows, errors = labels.import_classes(args.store, args.classes, key)
        print(f"classes joined: {len(rows)} volumes; unmatched rows: {len(errors)}")
        problems += len(errors)
    if args.split:
        fractions = tuple(float(v) for v in args.split.split(","))
        rows = labels.make_split(args.store, seed=args.seed, fractions=fractions)  # type: ignore[arg-type]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["split"]] = counts.get(r["split"], 0) + 1
        print(f"split (seed {args.seed}, patient-level, stratified): {counts}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from flows import runtime

    if args.action == "start":
        api = runtime.start_local_server(port=args.port)
        print(f"Prefect server {'started' if api.started_here else 'already running'}: UI {api.ui_url}")
        print(f"export PREFECT_API_URL={api.api_url}")
    elif args.action == "stop":
        print("stopped" if runtime.stop_local_server() else "no local server was running")
    else:
        state = runtime.local_server_status()
        print(json.dumps(state) if state else "no local server running")
    return 0


def _nightly_config(args: argparse.Namespace):
    from flows.nightly_config import NightlyConfig

    overrides = {k: v for k, v in (("store", args.store), ("sources", args.source)) if v}
    return NightlyConfig.from_file(args.config, **overrides)


def cmd_nightly(args: argparse.Namespace) -> int:
    """One nightly run now: ingest -> labels -> preprocess -> train -> infer."""
    config = _nightly_config(args)
    api = _prefect_api()
    from flows.nightly import run_nightly

    summary = run_nightly(config, dask_address=args.dask_address, n_workers=args.workers, api_url=api.api_url)
    for stage in summary["stages"]:
        print(f"{stage['stage']:<24} {stage.get('detail', '')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the deployments on this machine until interrupted (Ctrl-C / SIGTERM): a local
    Prefect server if none is configured, schedules, and a runner that executes the runs."""
    from flows.deployments import runner_deployments
    from flows.serve import serve, served_config_file

    config = _nightly_config(args)  # checked now: a broken file stops serve before it starts
    config_file = served_config_file(config, args.config, overridden=bool(args.store or args.source))
    api = _prefect_api()
    if args.dask_address:
        os.environ["VOXELFLOW_DASK_ADDRESS"] = args.dask_address  # the runs' subprocesses inherit it
    deps = runner_deployments(config_file, args.timezone, args.cron)
    scheduled = "; ".join(f"{d.name} at {s.schedule.cron!r} {s.schedule.timezone}" for d in deps for s in d.schedules)
    print(f"serving {len(deps)} deployments of deployment/prefect.yaml ({', '.join(d.name for d in deps)}); "
          f"{scheduled or 'none scheduled'}; UI {api.ui_url}/deployments", flush=True)
    serve(deps, api, limit=args.limit, keep_server=args.keep_server,
          stop_after_s=float(os.environ.get("VOXELFLOW_SERVE_STOP_S", 60)))
    print("stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxelflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Prefect's and Dask's INFO lines on the terminal (they always go to the log file)")

    def add_dask(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show Prefect's and Dask's INFO lines on the terminal (they always go to the log file)")
        p.add_argument("--dask-address", default=os.environ.get("VOXELFLOW_DASK_ADDRESS"),
                       help="existing Dask scheduler (default: $VOXELFLOW_DASK_ADDRESS, else a LocalCluster)")
        p.add_argument("--workers", type=int, default=None,
                       help="LocalCluster worker processes (default: one per core)")

    p = sub.add_parser("ingest", help="DICOM/NIfTI folders, archives or files into a store")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--store", required=True)
    p.add_argument("--scratch", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--secret-file", default=os.environ.get("VOXELFLOW_SECRET_FILE"),
                   help="de-identification key (default: $VOXELFLOW_HOME/keys/<store id>.key)")
    p.add_argument("--batch-size", type=int, default=None, help="files per header-scan task (default: up to 1024, 8 to 64 tasks)")
    p.add_argument("--chunk", type=int, default=64, help="chunk edge in voxels")
    p.add_argument("--json", default=None, help="also write the run summary to this file")
    p.add_argument("--keep-localizers", action="store_true",
                   help="store localizer / scout images as 2-D images (default: skipped with the reason)")
    p.add_argument("--resample-tilt", action="store_true",
                   help="resample gantry-tilted CT onto an orthogonal grid, as dcm2niix's _Tilt (default: the exact "
                        "sheared geometry)")
    add_dask(p)
    p.set_defaults(func=cmd_ingest)

    for name, helptext in (("nightly", "run the nightly pipeline once now"),
                           ("serve", "serve the nightly (scheduled), ingest and infer deployments on this machine")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="nightly configuration (JSON; see deployment/nightly.json)")
        p.add_argument("--store", default=None, help="override the configuration's store")
        p.add_argument("--source", action="append", help="override the configuration's sources (repeatable)")
        add_dask(p)
        if name == "serve":
            p.add_argument("--cron", default=os.environ.get("VOXELFLOW_NIGHTLY_CRON"),
                           help="nightly schedule (default: deployment/prefect.yaml's, 02:00: '0 2 * * *')")
            p.add_argument("--timezone", default=os.environ.get("VOXELFLOW_TIMEZONE", "UTC"),
                           help="time zone of the schedule, e.g. Europe/Berlin (default: $VOXELFLOW_TIMEZONE or UTC)")
            p.add_argument("--limit", type=int, default=None, help="most flow runs at once")
            p.add_argument("--keep-server", action="store_true",
                           help="leave a local Prefect server this command started running when it stops")
        p.set_defaults(func=cmd_nightly if name == "nightly" else cmd_serve)

    p = sub.add_parser("export", help="write each stored volume as OUTDIR/<volume_id>.nii.gz")
    p.add_argument("store")
    p.add_argument("outdir")
    p.add_argument("--volume", action="append", help="export only this volume (repeatable)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="sample archives -> ingest -> labels -> preprocess -> augment -> train -> infer")
    p.add_argument("--workdir", default="demo-output")
    p.add_argument("--patients", type=int, default=60, help="synthetic CT patients (2 in 5 with lesions)")
    p.add_argument("--train-epochs", type=int, default=15,
                   help="epochs for the demo's segmentation and classification models (0: skip training)")
    add_dask(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("qc", help="write the store's QC gallery (STORE/qc/index.html): planes, outlines, reasons")
    p.add_argument("store")
    p.add_argument("--force", action="store_true", help="draw every volume again")
    p.add_argument("--workers", type=int, default=None, help="volumes drawn at once (default: one per core)")
    p.set_defaults(func=cmd_qc)

    p = sub.add_parser("catalog", help="SQL (DuckDB) over the store's catalog tables")
    p.add_argument("store")
    p.add_argument("sql", help="a query over volumes, files, labels, classes, splits, predictions, lesions")
    p.add_argument("--csv", help="write the result to this CSV file (lists as JSON text)")
    p.add_argument("--parquet", help="write the result to this Parquet file")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown on the terminal (default 50)")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("preprocess", help="reorient, resample, crop, normalise into a versioned copy")
    p.add_argument("store")
    p.add_argument("--spacing", help="target x,y,z mm (default: median of the volumes; 10th percentile on a much coarser axis)")
    p.add_argument("--interpolation", choices=["linear", "spline"], default="linear")
    p.add_argument("--no-crop", action="store_true", help="keep the whole field of view")
    p.add_argument("--volume", action="append", help="only this volume (repeatable)")
    p.add_argument("--labelled-only", action="store_true", help="only volumes with a segmentation")
    p.add_argument("--plan", nargs="?", const="latest", default=None, metavar="PLAN",
                   help="spacing and normalisation from a plan of `voxelflow plan` (default: the newest); "
                        "--spacing still wins")
    add_dask(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("plan", help="plan spacing, normalisation, patch, batch and depth from the data (nnU-Net's rules)")
    p.add_argument("store")
    p.add_argument("--version", help="a preprocessed copy: plan for its grid (default: the raw labelled volumes)")
    p.add_argument("--task", default="segmentation", help="the task to plan for")
    p.add_argument("--label-name", default="segmentation", help="the label whose volumes are fingerprinted")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="the training device's memory (default: this machine's GPU, else a CPU budget of 2 GiB)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a setting given (patch_size, batch_size, channels): kept, the rest planned around it")
    p.add_argument("--json", default=None, help="also write the plan to this file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("augment", help="N augmented copies per preprocessed volume, parameters stored")
    p.add_argument("store")
    p.add_argument("--version", required=True, help="the preprocessed copy (see `voxelflow preprocess`)")
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", help="only volumes of this split ('' for all)")
    add_dask(p)
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("train", help="train a model on a preprocessed copy; register and promote it")
    p.add_argument("store")
    p.add_argument("--version", required=True, help="the preprocessed copy")
    p.add_argument("--task", default="segmentation", help="segmentation, classification, autoencoder or gan (models.tasks)")
    p.add_argument("--config", help="JSON file of TrainConfig fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (JSON value); patch_size, batch_size and channels not set are "
                        "planned from the data (`voxelflow plan`)")
    p.add_argument("--no-plan", action="store_true",
                   help="keep TrainConfig's defaults for the settings not given instead of planning them")
    p.add_argument("--name", help="registry name (default: the task)")
    p.add_argument("--no-augment", action="store_true", help="no on-the-fly augmentation")
    p.add_argument("--augment", action="append", metavar="KEY=VALUE",
                   help="override an on-the-fly augmentation range (AugmentConfig field, JSON value)")
    p.add_argument("--gpu", action="store_true", default=None, help="run on a Dask worker with resource GPU")
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="data-parallel ranks, one per Dask worker (with --gpu: one per GPU worker)")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="k-fold cross-validation inside the train split: K models, trained in parallel")
    p.add_argument("--rank-timeout", type=float, default=None, metavar="S",
                   help="seconds a rank waits for the others before the run fails (default 600)")
    add_dask(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("infer", help="run a registered model over the store; predictions into the store")
    p.add_argument("store")
    p.add_argument("--name", default="segmentation", help="registry name of the model")
    p.add_argument("--model", help="model version (default: the registry's current one)")
    p.add_argument("--ensemble", nargs="?", const="latest", default=None, metavar="GROUP",
                   help="predict with the mean probabilities of a cross-validated run's folds "
                        "(default: the newest run trained with --folds)")
    p.add_argument("--split", help="only volumes of this split")
    p.add_argument("--volume", action="append", help="only this volume (repeatable)")
    p.add_argument("--export", help="also write segmentation predictions as NIfTI into this folder")
    p.add_argument("--dicom-seg", help="also write DICOM-SEG (DICOM-sourced volumes whose files are still there)")
    p.add_argument("--gpu", action="store_true", default=None, help="run on Dask workers with resource GPU")
    add_dask(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("export-model", help="TorchScript / ONNX export of a registered model, parity-checked")
    p.add_argument("store")
    p.add_argument("--name", default="segmentation")
    p.add_argument("--model", help="version (default: current)")
    p.add_argument("--format", action="append", choices=["torchscript", "onnx"], default=None)
    p.set_defaults(func=cmd_export_model)

    p = sub.add_parser("synth", help="write a deterministic labelled synthetic archive (CT DICOM + MR NIfTI)")
    p.add_argument("outdir")
    p.add_argument("--patients", type=int, default=20, help="CT patients (about 1 in 5 with lesions)")
    p.add_argument("--mr-patients", type=int, default=4, help="MR-like NIfTI volumes from the MNI template")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("labels", help="attach segmentations and classes to stored volumes; split by patient")
    p.add_argument("store")
    p.add_argument("--segmentations", help="CSV: image (SeriesInstanceUID or nifti:<path>), segmentation[, name]")
    p.add_argument("--classes", help="CSV: series_instance_uid (or image), label")
    p.add_argument("--split", default="0.7,0.15,0.15", help="train,validation,test fractions ('' to skip)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--secret-file", default=os.environ.get("VOXELFLOW_SECRET_FILE"))
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("server", help="voxelflow's local Prefect server")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_server)
    return parser


# commands that run Prefect flows: their per-task INFO lines go to a log file, their progress
# artifacts are drawn as bars
FLOW_COMMANDS = {"ingest", "preprocess", "augment", "train", "infer", "nightly", "demo"}


def _run(args: argparse.Namespace) -> int:
    if args.command not in FLOW_COMMANDS:
        return args.func(args)
    from flows.terminal import ProgressBars, quiet_logging, run_tag

    # before Prefect and Dask are imported: their logging reads it once, and the Dask worker
    # processes started later inherit it
    log_file = quiet_logging(args.command, args.verbose)
    print(f"log: {log_file}", file=sys.stderr)
    tag = run_tag()
    from prefect import tags

    with tags(tag), ProgressBars(tag, enabled=not args.verbose):
        return args.func(args)


def main(argv: list[str] | None = None) -> int:
    # Dask's scheduler/nanny/worker INFO lines drown the progress bars; keep warnings (-v:
    # flows.terminal.quiet_logging). Set before dask is imported, so worker processes inherit it.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except VoxelflowError as exc:  # a user-facing failure: one line, no traceback
        print(f"voxelflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a setting pydantic refused (--set key=value, a config file)
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        print(f"voxelflow {args.command}: error: invalid settings: {problems}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
