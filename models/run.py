"""A whole training run against a store: data from the preprocessed copy's splits, ``fit``,
evaluation on the test split, registration and promotion. No Prefect here (``tasks/train.py``
adds artifacts)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from models import evaluate
from models.networks import from_config
from models.train import TrainConfig, fit
from voxelflow import catalog, location, registry
from voxelflow.augment import AugmentConfig, OnTheFly
from voxelflow.data import make_loader, patch_dataset
from voxelflow.errors import SettingError

MONITOR = {"segmentation": "dice", "classification": "f1", "autoencoder": "psnr", "gan": "monitor"}


class TrainRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    store: str
    version: str  # the preprocessed copy
    name: str | None = None  # registry name (default: the task)
    train: TrainConfig = TrainConfig()
    augment: bool = True  # on-the-fly augmentation of training patches
    # Its ranges: spatial only by default. No mirroring: body anatomy is lateralised (liver
    # right, spleen left) and a flipped abdomen teaches the network to confuse them. No
    # intensity changes: CT values are calibrated (HU), and gamma/contrast changes blur the
    # 30-60 HU that tell liver from muscle and spleen (README: what it cost on the demo store).
    # Elastic deformation is off for speed (MONAI's 3-D elastic transform costs more than a CPU
    # training step). Pass a full AugmentConfig() for MR or multi-site data.
    augmentation: AugmentConfig = AugmentConfig(flip_prob=0.0, elastic_prob=0.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0),
                                                noise_std=(0.0, 0.0), bias_prob=0.0)
    label_name: str = "segmentation"


# A classifier's augmentation of choice on a CPU (the demo's, bench/classifier.py's default):
# flips only, over the spatial default: rotation and scaling cost several times a 2-D slice's
# training step in MONAI's Python, and flips generalised as well on the demo's lesions (README).
FLIPS_ONLY = {"rotate_deg": 0.0, "scale": [1.0, 1.0], "translate_vox": 0.0, "flip_prob": 0.5}


def _datasets(run: TrainRun):

    c = run.train
    kw = _classification_sampling(c)
    n = c.steps_per_epoch * c.batch_size
    transform = OnTheFly(run.augmentation, seed=c.seed) if run.augment else None
    label = _label_name(run)
    kw = kw | ({"label_map": c.label_map} if c.label_map else {})
    train = patch_dataset(run.store, c.patch_size, version=run.version, split="train", samples_per_epoch=n,
                          seed=c.seed, transform=transform, label_name=label, cache_mb=c.cache_mb, **kw)
    if kw.get("focus") and not train._focus_entries:
        raise SettingError(f"positive_label {c.positive_label}: no training volume has voxels of that label "
                         f"(preprocessed copy {run.version})")
    val = patch_dataset(run.store, c.patch_size, version=run.version, split="validation",
                        samples_per_epoch=c.val_steps * c.batch_size, seed=c.seed + 1, label_name=label,
                        cache_mb=c.cache_mb, **kw)
    return train, val


def _label_name(run: TrainRun) -> str | None:
    """The label patches a task needs: segmentation, classification (foreground sampling, patch
    targets); autoencoders and GANs learn from images alone, labelled or not."""
    return run.label_name if run.train.task in ("segmentation", "classification") else None


def _classification_sampling(c: TrainConfig) -> dict:
    """Patch sampling for classifiers: volumes drawn class-balanced; with patch targets from
    the segmentation, ``positive_share`` of the patches centred on the positive label and the
    rest half on an organ, half anywhere (inference sees every window, not only those on an
    organ); else every patch on a labelled voxel."""
    if c.task != "classification":
        return {}
    if c.positive_label is None:
        return dict(class_balanced=True, foreground_oversample=1.0)
    if c.positive_class is None:
        raise SettingError("positive_label needs positive_class (the class a patch holding that label has)")
    return dict(class_balanced=True, foreground_oversample=1 / 2,
                class_from_label=(c.positive_label, c.min_positive_voxels, c.positive_class),
                focus=(c.positive_label, c.positive_share) if c.positive_share > 0 else None)


def _class_counts(run: TrainRun, classes: list[str]) -> tuple[dict[int, int], int]:
    if run.train.task == "classification":
        rows = catalog.read_table(run.store, "classes").to_pylist()
        counts = defaultdict(int)
        for r in rows:
            if r["label"] in classes:
                counts[classes.index(r["label"])] += 1
        return dict(counts), max(2, len(classes))
    counts = defaultdict(int)
    merged = run.train.label_map
    for r in catalog.read_table(run.store, "labels").to_pylist():
        if r["name"] == run.label_name:
            for v, n in zip(r["values"], r["voxels"]):
                counts[merged.get(int(v), int(v))] += int(n)
    return dict(counts), max(2, max(counts, default=1) + 1)


def train_model(run: TrainRun, *, on_epoch=None, device: torch.device | None = None) -> dict[str, Any]:
    """Train (resuming if this exact run was interrupted), evaluate, register, promote."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = run.train
    name = run.name or c.task
    snapshot = registry.data_snapshot(run.store, run.version)
    version = registry.version_id(run.model_dump(exclude={"store"}), snapshot)
    folder = registry.version_dir(run.store, name, version)
    train, val = _datasets(run)
    counts, num_classes = _class_counts(run, train.classes)
    validator = _volume_validator(run, num_classes, device, train.classes)
    result = fit(c, train, val, folder, num_classes=num_classes, class_counts=counts, device=device,
                 on_epoch=on_epoch, validator=validator)
    location.write_bytes(folder / "weights.pt", location.read_bytes(folder / "best.pt"))
    best = location.torch_load(folder / "weights.pt", map_location=device, weights_only=True)
    history = result["history"]
    best_row = next(h for h in history if h["epoch"] == result["best_epoch"])
    threshold = best_row.get("threshold")  # tuned by the validator on the best epoch's volumes
    test_metrics = _evaluate(run, best, num_classes, device, folder, train.classes, threshold)
    metrics = {"validation": best_row, "test": test_metrics, "history": history, "stopped": result["stopped"]}
    config = run.model_dump(exclude={"store"}) | {"classes": train.classes, "threshold": threshold}
    registry.register(run.store, name, version, config=config, snapshot=snapshot, metrics=metrics,
                      monitor=_monitor(c))
    promoted = registry.promote_if_better(run.store, name, version)
    _curve(history, folder / "curve.png", f"validation {_monitor(c) if c.task != 'gan' else '-stat distance'}")
    return {"name": name, "version": version, "folder": str(folder), "promoted": promoted, "device": str(device),
            "best_epoch": result["best_epoch"], "validation": best_row, "test": test_metrics,
            "epochs": len(history), "stopped": result["stopped"]}


def _split_volumes(run: TrainRun, split: str, labelled: bool = False) -> list[str]:
    """Preprocessed volumes of one split (with a label map, if ``labelled``)."""
    return [r["volume_id"] for r in catalog.preprocessed_volumes(run.store, run.version, split)
            if r["classes"] or not labelled]


def _volume_classes(run: TrainRun, ids: list[str], classes: list[str]) -> tuple[list[str], list[int]]:
    by_id = {r["volume_id"]: r["label"] for r in catalog.read_table(run.store, "classes").to_pylist()}
    kept = [v for v in ids if by_id.get(v) in classes]
    return kept, [classes.index(by_id[v]) for v in kept]


def _positive(c: TrainConfig, classes: list[str]) -> int | None:
    if c.positive_class is None:
        return None
    if len(classes) != 2 or c.positive_class not in classes:
        raise SettingError(f"positive_class {c.positive_class!r} needs two classes including it, not {classes}")
    return classes.index(c.positive_class)


def _volume_validator(run: TrainRun, num_classes: int, device: torch.device, classes: list[str]):
    """Validation on whole validation volumes (sliding window, as the test evaluation and
    inference see them), not on a handful of random patches: the monitor that picks the best
    checkpoint and stops training early is then the quantity reported. Segmentation: mean
    Dice; classification: F1 of the volumes' classes. Other tasks validate on patches."""
    c = run.train
    root = f"{run.store}/preprocessed/{run.version}"
    if c.task == "classification":
        ids, truths = _volume_classes(run, _split_volumes(run, "validation"), classes)
        if not ids:
            return None
        positive = _positive(c, classes)

        def validate_classes(models: dict) -> dict[str, float]:
            out = evaluate.classification_volumes(models["model"], root, ids, truths, num_classes, c.patch_size,
                                                  device, positive)
            # detection: the ranking (ROC-AUC) picks the checkpoint, and its operating threshold
            # is the one that maximises F1 on these volumes. A volume's probability is the
            # largest of its windows', so the patch-level 0.5 is not a volume-level operating point.
            # (ties broken by the gap between the lowest positive and the highest negative score)
            auc = 0.0 if np.isnan(out["roc_auc"]) else out["roc_auc"]
            if positive is None:
                return {"accuracy": out["accuracy"], "f1": out["f1"], "roc_auc": out["roc_auc"], "monitor": out["f1"]}
            scores, truth = out["_scores"][:, positive], np.asarray(truths) == positive
            margin = float(scores[truth].min() - scores[~truth].max()) if truth.any() and (~truth).any() else 0.0
            return {"accuracy": out["accuracy"], "f1": out["f1"], "roc_auc": out["roc_auc"], "margin": margin,
                    "threshold": evaluate.operating_threshold(scores, truth), "monitor": auc + 0.01 * margin}

        return validate_classes
    if c.task != "segmentation":
        return None
    ids = _split_volumes(run, "validation", labelled=True)
    if not ids:
        return None

    def validate(models: dict) -> dict[str, float]:
        out = evaluate.segmentation(models["model"], root, ids, c.patch_size, num_classes, device, run.label_name,
                                    largest=c.keep_largest, hausdorff=False, label_map=c.label_map)
        dice = 0.0 if np.isnan(out["dice"]) else out["dice"]
        return {"dice": dice, **{k: v for k, v in out.items() if k.startswith("dice_")}, "monitor": dice}

    return validate


def _monitor(c: TrainConfig) -> str:
    return "roc_auc" if c.task == "classification" and c.positive_class is not None else MONITOR[c.task]


def _evaluate(run: TrainRun, weights: dict, num_classes: int, device: torch.device, folder,
              classes: list[str], threshold: float | None = None) -> dict[str, Any]:
    c = run.train
    root = f"{run.store}/preprocessed/{run.version}"
    if c.task == "gan":
        g, _ = from_config(c)
        g.load_state_dict(weights["generator"])
        g.to(device)
    else:
        model = from_config(c, num_classes)
        model.load_state_dict(weights["model"])
        model.to(device)
    if c.task == "segmentation":
        return evaluate.segmentation(model, root, _split_volumes(run, "test", labelled=True), c.patch_size,
                                     num_classes, device, run.label_name, largest=c.keep_largest,
                                     label_map=c.label_map)
    test = patch_dataset(run.store, c.patch_size, version=run.version, split="test",
                         samples_per_epoch=max(8, c.val_steps * c.batch_size), seed=c.seed + 2,
                         label_name=_label_name(run), **_classification_sampling(c))
    batches = list(make_loader(test, batch_size=c.batch_size))
    if c.task == "classification":
        # The volumes' classes are what a user asks for; patch metrics are kept alongside.
        positive = _positive(c, classes)
        patches = evaluate.classification(model, batches, num_classes, device, positive or 0)
        ids, truths = _volume_classes(run, _split_volumes(run, "test"), classes)
        out = evaluate.classification_volumes(model, root, ids, truths, num_classes, c.patch_size, device, positive,
                                              threshold) if ids else {}
        out.pop("_scores", None)
        if threshold is not None:
            out["threshold"] = threshold
        return out | {f"patch_{k}": v for k, v in patches.items() if k in ("accuracy", "f1", "roc_auc", "samples")}
    if c.task == "autoencoder":
        return evaluate.autoencoder(model, batches, device)
    out = evaluate.gan(g, batches, c.latent_size, device, seed=c.seed)
    from PIL import Image

    location.save_png(Image.fromarray(evaluate.sample_grid(out.pop("_fake"))), folder / "samples.png")
    return out


def _curve(history: list[dict], path, monitor_label: str) -> None:
    """Training loss and validation metric per epoch, drawn with PIL (no plotting library)."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    epochs = [r["epoch"] for r in history]
    for key, colour in (("train_loss", (200, 40, 40)), ("monitor", (30, 90, 200))):
        values = np.array([r[key] for r in history], dtype=float)
        if len(values) < 1 or not np.isfinite(values).any():
            continue
        lo, hi = np.nanmin(values), np.nanmax(values)
        span = (hi - lo) or 1.0
        pts = [(pad + (e - epochs[0]) / max(1, epochs[-1] - epochs[0]) * (w - 2 * pad),
                h - pad - (v - lo) / span * (h - 2 * pad)) for e, v in zip(epochs, values)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        name = "training loss" if key == "train_loss" else monitor_label
        draw.text((w - pad - 230, h - pad - (40 if key == "train_loss" else 22)),
                  f"{name} ({lo:.3g} .. {hi:.3g})", fill=colour)
    draw.text((w // 2 - 20, h - pad + 10), f"epoch {epochs[0]}..{epochs[-1]}", fill="black")
    location.save_png(img, path)
