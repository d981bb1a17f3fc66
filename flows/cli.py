"""``voxelflow`` command line: the parser and its entry point (the commands are in
``flows.commands``: data, models, operate), and the demo, which runs the others through it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from flows.commands.data import (
    cmd_augment, cmd_catalog, cmd_export, cmd_ingest, cmd_labels, cmd_preprocess, cmd_qc, cmd_synth, preprocess_copy,
)
from flows.commands.models import cmd_export_model, cmd_infer, cmd_plan, cmd_train
from flows.commands.operate import cmd_nightly, cmd_serve, cmd_server
from voxelflow.errors import VoxelflowError


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
    version = preprocess_copy(_parse("preprocess", store, "--labelled-only", *dask))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxelflow", description="Imaging archives (DICOM, NIfTI) into an OME-Zarr store with a catalog; "
                                      "learning-ready data, training and inference on it, as Prefect flows on Dask.")
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
    p.add_argument("--no-warm", action="store_true",
                   help="start the server alone, without the warm runner that spares later commands their imports")
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


def entry() -> None:
    """The ``voxelflow`` command: run in a child of the warm runner that ``voxelflow server
    start`` leaves up, when it serves this environment (:mod:`flows.warm`), else here."""
    from flows.warm import fast_exit, run_warm

    rc = run_warm(sys.argv[1:])
    fast_exit(main() if rc is None else rc)


if __name__ == "__main__":
    entry()
