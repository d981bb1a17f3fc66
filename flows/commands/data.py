"""The data commands: ingest, export, labels, preprocess, augment, synth, catalog (SQL), qc."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from flows.commands.common import prefect_api
from voxelflow import location
from voxelflow.errors import SourceError


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
    api = prefect_api()
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


def preprocess_copy(args: argparse.Namespace) -> str:
    from voxelflow.preprocess import PreprocessConfig
    from voxelflow.store import store_id

    store_id(args.store)
    planned: dict = {}
    if args.plan:
        from models.plan import Plan
        from voxelflow import registry

        record = registry.load_plan(args.store, None if args.plan == "latest" else args.plan)
        planned = Plan.model_validate(record).preprocess_settings()
        print(f"plan {record['plan_id']}: spacing {list(planned['spacing'])} mm"
              + (f", CT window {list(planned['ct_window'])}" if "ct_window" in planned else ""))
    spacing = tuple(float(v) for v in args.spacing.split(",")) if args.spacing else None
    config = PreprocessConfig(store=args.store, volumes=args.volume or None, interpolation=args.interpolation,
                              crop_foreground=not args.no_crop, labelled_only=args.labelled_only,
                              **(planned | ({"spacing": spacing} if spacing else {})))
    api = prefect_api()
    from flows.preprocess import run_preprocess

    summary = run_preprocess(config, dask_address=args.dask_address, n_workers=args.workers, api_url=api.api_url)
    print(f"preprocessed copy {summary['output']} (version {summary['version']}, spacing {summary['spacing']} mm): "
          f"{summary['processed']} processed, {summary['unchanged']} unchanged, {summary['failed']} failed")
    for vid, reason in summary["failures"]:
        print(f"  failed {vid}: {reason}")
    return summary["version"]


def cmd_preprocess(args: argparse.Namespace) -> int:
    preprocess_copy(args)
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from voxelflow.augment import OfflineConfig

    config = OfflineConfig(store=args.store, version=args.version, copies=args.copies, seed=args.seed,
                           split=args.split or None)
    api = prefect_api()
    from flows.augment import run_augment

    summary = run_augment(config, dask_address=args.dask_address, n_workers=args.workers, api_url=api.api_url)
    print(f"augmented copies in {summary['output']}: {summary['made']} made, {summary['existing']} already there")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    out = build_synthetic_archive(args.outdir, SynthConfig(patients=args.patients, mr_patients=args.mr_patients,
                                                           seed=args.seed))
    print(f"synthetic archive in {out}: images/ (ingest this), labels/labels.csv, labels/segmentations.csv")
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
