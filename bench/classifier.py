"""The demo's lesion detector on its own, with any budget and any of its settings.

    .venv/bin/python bench/classifier.py prepare --out .gpustore      # on a CPU machine
    .venv/bin/python bench/classifier.py train --store .gpustore/store    # the demo's 2-D settings
    .venv/bin/python bench/classifier.py train --patch 24,48,48 --stem-stride 1 --batch 4 --steps 20 \
        --augment spatial --workers 0                                      # the 3-D one it replaced

``prepare`` builds the demo's synthetic archive (``SynthConfig(patients=60, mr_patients=2,
positive_fraction=0.4)``), ingests it, attaches segmentations and classes, splits 0.6/0.2/0.2
(seed 0) and preprocesses the labelled volumes, then keeps only what training reads (the
catalog tables and the preprocessed copy) under ``--out``: small enough to carry to a GPU
machine that lacks the DICOM codecs and nilearn the archive is built with.

``train`` trains the classifier with the demo's settings by default (a 2-D slice classifier:
patch 1x64x64, stride-2 stem, batch 32, 100 steps an epoch, flips as the only augmentation;
lesion as the positive class, patch targets from label 2, early stopping after 8 epochs
without a better validation ROC-AUC) or those given on the command line, printing every epoch's
whole-volume validation metrics and the final test metrics as JSON lines and a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # datasets.py beside this file


def prepare(out: Path, patients: int) -> None:
    from datasets import labelled_store

    work = out.parent / (out.name + "-work")
    t0 = time.perf_counter()
    store, version, summary = labelled_store(work, patients, mr_patients=2)
    # what training reads: the catalog tables and the preprocessed copy (not the ingested volumes)
    shutil.rmtree(out, ignore_errors=True)
    (out / "store").mkdir(parents=True)
    shutil.copytree(store / "catalog", out / "store" / "catalog")
    shutil.copytree(store / "preprocessed" / version, out / "store" / "preprocessed" / version)
    for name in ("store.json", "zarr.json"):
        if (store / name).exists():
            shutil.copy2(store / name, out / "store" / name)
    (out / "ready.json").write_text(json.dumps({"store": "store", "version": version}))
    print(json.dumps({"version": version, "processed": summary.get("processed"),
                      "seconds": round(time.perf_counter() - t0, 1)}))


def train(args) -> None:
    import torch

    from models.run import FLIPS_ONLY, TrainRun, train_model
    from models.train import TrainConfig

    store = Path(args.store)
    if args.copy_to:  # the registry writes into the store: train on a scratch copy
        shutil.rmtree(args.copy_to, ignore_errors=True)
        shutil.copytree(store, args.copy_to)
        store = Path(args.copy_to)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TrainConfig(task="classification", epochs=args.epochs, early_stopping=args.early_stopping,
                         steps_per_epoch=args.steps, batch_size=args.batch,
                         patch_size=tuple(int(v) for v in args.patch.split(",")), stem_stride=args.stem_stride,
                         positive_class="lesion", positive_label=2, amp=args.amp,
                         num_workers=args.workers, lr=args.lr, seed=args.seed)
    default = TrainRun.model_fields["augmentation"].default  # spatial: rotation, scale, translation
    flips = type(default)(**default.model_dump() | FLIPS_ONLY)
    run = TrainRun(store=str(store), version=args.version, name=args.name, train=config,
                   augment=args.augment != "none", augmentation=flips if args.augment == "flips" else default)
    if args.budget_s:
        # as many epochs as fit the budget (the cosine schedule needs the number up front),
        # from the time the training loader takes for a few batches: on a GPU the patches
        # (read and augmented on the CPU) bound the step, not the network
        per_batch = _loader_seconds_per_batch(run)
        epoch_s = args.steps * per_batch * 1.15 + args.val_s
        epochs = max(1, min(args.epochs, int((args.budget_s - args.test_s) / epoch_s)))
        print(json.dumps({"loader_s_per_batch": round(per_batch, 4), "estimated_epoch_s": round(epoch_s, 1),
                          "epochs": epochs}), flush=True)
        config = config.replace(epochs=epochs)
        run = run.model_copy(update={"train": config})
    print(json.dumps({"config": config.flat(), "augment": args.augment, "device": str(device),
                      "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}), flush=True)
    t0 = time.perf_counter()

    def on_epoch(row):
        keep = ("epoch", "train_loss", "roc_auc", "f1", "accuracy", "margin", "threshold", "lr", "seconds",
                "samples_per_s", "data_wait_share")
        print(json.dumps({"elapsed_s": round(time.perf_counter() - t0, 1),
                          **{k: row.get(k) for k in keep}}), flush=True)

    summary = train_model(run, on_epoch=on_epoch, device=device)
    wall = time.perf_counter() - t0
    test = summary["test"]
    print(json.dumps({"wall_s": round(wall, 1), "best_epoch": summary["best_epoch"], "epochs": summary["epochs"],
                      "stopped": summary["stopped"], "validation": summary["validation"], "test": test},
                     default=str), flush=True)
    print(f"\nclassifier, {summary['epochs']} epochs x {args.steps} steps x batch {args.batch} on {device}, "
          f"{wall:.0f} s; best epoch {summary['best_epoch']} ({summary['stopped']})\n")
    print("| split | volumes | F1 | ROC-AUC | accuracy | confusion [[TP, FN], [FP, TN]] | threshold |")
    print("|---|---:|---:|---:|---:|---|---:|")
    v = summary["validation"]
    print(f"| validation (best epoch) | | {v.get('f1', float('nan')):.3f} | {v.get('roc_auc', float('nan')):.3f} | "
          f"{v.get('accuracy', float('nan')):.3f} | | {v.get('threshold')} |")
    print(f"| test | {test.get('volumes')} | {test.get('f1', float('nan')):.3f} | "
          f"{test.get('roc_auc', float('nan')):.3f} | {test.get('accuracy', float('nan')):.3f} | "
          f"{test.get('confusion')} | {test.get('threshold')} |")


def _loader_seconds_per_batch(run, batches: int = 24) -> float:
    from models.run import _datasets
    from voxelflow.data import make_loader

    train_ds, _ = _datasets(run)
    warm = max(2, run.train.sampling.num_workers)
    train_ds.samples_per_epoch = (warm + batches) * run.train.sampling.batch_size
    train_ds.set_epoch(10_000)  # patches no epoch of the run uses
    it = iter(make_loader(train_ds, batch_size=run.train.sampling.batch_size, num_workers=run.train.sampling.num_workers))
    for _ in range(warm):  # worker start-up and their first batches
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default=str(ROOT / ".gpustore"))
    p.add_argument("--patients", type=int, default=60)
    t = sub.add_parser("train")
    t.add_argument("--store", default=str(ROOT / ".gpustore" / "store"))
    t.add_argument("--version", default=None, help="default: the one prepare recorded")
    t.add_argument("--copy-to", default=None, help="train on a copy of the store made here")
    t.add_argument("--name", default="classification")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--patch", default="1,64,64", help="z,y,x; z = 1: a 2-D slice classifier")
    t.add_argument("--stem-stride", type=int, default=2)
    t.add_argument("--augment", choices=["flips", "spatial", "none"], default="flips",
                   help="on the fly: flips only (the demo's classifier), rotation/scale/translation, none")
    t.add_argument("--workers", type=int, default=0, help="loader worker processes")
    t.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    t.add_argument("--early-stopping", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--budget-s", type=float, default=0, help="fewer epochs, if need be, to end in about this time")
    t.add_argument("--val-s", type=float, default=5.0, help="validation seconds per epoch, for --budget-s")
    t.add_argument("--test-s", type=float, default=40.0, help="start-up and test seconds, for --budget-s")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out), args.patients)
    else:
        if args.version is None:
            args.version = json.loads((Path(args.store).parent / "ready.json").read_text())["version"]
        train(args)


if __name__ == "__main__":
    main()
