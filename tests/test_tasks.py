"""ML tasks as classes: the configuration's typed parts load from flat settings as before, a
metric name means one thing in validation and evaluation, and a new task is one class plus a
registry entry, with nothing else in models/ or flows/ changed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from models import metrics
from models.config import TrainConfig, undot
from models.run import TrainRun
from models.tasks import TASKS, Task, task_for
from tests.conftest import TINY_TRAIN, run_cli

# Every setting a TrainConfig had before it had parts, with its default: flat configuration
# files, `--set` and registry entries name these, and the registry's version id is a digest of
# them, so they must not change.
FLAT_DEFAULTS = {
    "task": "segmentation", "patch_size": (32, 64, 64), "batch_size": 2, "epochs": 20, "steps_per_epoch": 25,
    "val_steps": 10, "lr": 1e-3, "weight_decay": 1e-4, "dropout": 0.1, "channels": (16, 32, 64, 128), "amp": False,
    "cudnn_benchmark": False, "class_weighting": None, "early_stopping": 5, "seed": 0, "num_workers": 0,
    "cache_mb": 512, "latent_size": 64, "keep_largest": (), "label_map": {}, "denoise_std": 0.1,
    "positive_class": None, "positive_label": None, "min_positive_voxels": 8, "positive_share": 0.5,
    "pooling": "avg", "norm": "batch", "stem_stride": 1,
}


def test_flat_settings_load_into_the_typed_parts_and_come_back():
    assert TrainConfig().flat() == FLAT_DEFAULTS
    flat = {"task": "classification", "patch_size": [1, 64, 64], "lr": 3e-4, "stem_stride": 2,
            "positive_class": "lesion", "positive_label": 2, "keep_largest": []}
    config = TrainConfig(**flat)
    assert config.sampling.patch_size == (1, 64, 64) and config.optimisation.lr == 3e-4
    assert config.network.stem_stride == 2 and config.sampling.positive_label == 2
    # the nested form (what the registry now stores) and the flat form are one configuration
    nested = json.loads(config.model_dump_json())
    assert set(nested) == {"task", "label_map", "positive_class", "network", "sampling", "optimisation", "postprocess"}
    assert TrainConfig(**nested) == config == TrainConfig(**config.flat())
    # a part given whole and a field of it given flat: the flat field wins, the rest stays
    mixed = TrainConfig(sampling={"batch_size": 8, "patch_size": [8, 16, 16]}, batch_size=4)
    assert (mixed.sampling.batch_size, mixed.sampling.patch_size) == (4, (8, 16, 16))
    assert config.replace(**{"optimisation.lr": 1e-2}).optimisation.lr == 1e-2
    assert undot({"sampling.batch_size": 3, "lr": 1}) == {"batch_size": 3, "lr": 1}
    assert {"lr", "optimisation.lr", "task"} <= TrainConfig.field_names()
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig(bogus=1)


def test_the_version_id_of_a_run_is_that_of_its_flat_settings():
    """A model retrained with the same settings keeps the version id it had before the
    settings had parts (the id is the digest of the flat form), so a run still resumes."""
    from voxelflow import registry

    run = TrainRun(store="s", version="v", train=TrainConfig(epochs=3))
    # the run's fields before the settings had parts (and before world_size, rank_timeout_s, folds, plan)
    added = {"world_size", "rank_timeout_s", "folds", "fold", "plan"}
    before = TrainRun(store="s", version="v").model_dump(exclude={"store", "train"} | added) | \
        {"train": FLAT_DEFAULTS | {"epochs": 3}}
    snapshot = {"catalog_digest": "d"}
    assert registry.version_id(run.identity(), snapshot) == registry.version_id(json.loads(json.dumps(before)),
                                                                               snapshot)
    # a setting added since changes the id once set: two ranks train another model
    assert registry.version_id(run.model_copy(update={"world_size": 2}).identity(), snapshot) != \
        registry.version_id(run.identity(), snapshot)
    assert run.model_copy(update={"rank_timeout_s": 5.0}).identity() == run.identity()
    # planned or typed, the same settings train the same model
    assert run.model_copy(update={"plan": "p1"}).identity() == run.identity()


def test_an_unknown_task_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'regression'.*segmentation"):
        TrainConfig(task="regression")
    proc = run_cli("train", tmp_path, "--version", "v", "--task", "regression")
    assert proc.returncode == 2 and "unknown task 'regression'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_each_task_names_what_it_monitors():
    assert {n: task_for(TrainConfig(task=n)).monitor_key() for n in TASKS} == {
        "segmentation": "dice", "classification": "macro_f1", "autoencoder": "psnr", "gan": "monitor"}
    assert task_for(TrainConfig(task="classification", positive_class="x")).monitor_key() == "roc_auc"
    assert [n for n, t in TASKS.items() if t.predicts] == ["segmentation", "classification"]


def test_classification_validation_reports_the_metrics_of_the_metric_module(preprocessed_store):
    """"f1" in a validation row is the F1 of the positive class, as in the test evaluation
    (``models.metrics.classification``); the mean over classes is "macro_f1"."""
    from voxelflow.data import make_loader, patch_dataset

    store, version = preprocessed_store
    config = TrainConfig(task="classification", **TINY_TRAIN)
    task = task_for(config, 2)
    nets = task.networks()
    nets["model"].eval()
    ds = patch_dataset(store, config.sampling.patch_size, version=version, split=None, samples_per_epoch=8,
                       seed=3, class_balanced=True, foreground_oversample=1.0)
    batches = list(make_loader(ds, batch_size=4))
    with torch.no_grad():
        row = task.validate(nets, batches, torch.device("cpu"))
        y = torch.cat([b["class"] for b in batches])
        p = torch.cat([torch.softmax(nets["model"](b["image"]), 1) for b in batches])
    want = metrics.classification(y, p, 2, positive=0)
    assert row["f1"] == pytest.approx(want["f1"]) and row["macro_f1"] == pytest.approx(want["macro_f1"])
    assert row["monitor"] == pytest.approx(want["macro_f1"])
    by_hand = []
    for k in (0, 1):
        tp = int(((p.argmax(1) == k) & (y == k)).sum())
        prec, rec = tp / max(1, int((p.argmax(1) == k).sum())), tp / max(1, int((y == k).sum()))
        by_hand.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    assert want["macro_f1"] == pytest.approx(sum(by_hand) / 2) and want["f1"] == pytest.approx(by_hand[0])


class MeanIntensity(Task):
    """A fifth task, as a user would add one: regress a patch's mean intensity."""

    name = "mean-intensity"
    monitor = "neg_mae"

    def networks(self):
        return {"model": nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                                       nn.Flatten(), nn.Linear(4, 1))}

    def loss(self, class_weights):
        return nn.MSELoss()

    def train_step(self, nets, loss, batch, update, device):
        x = batch["image"].to(device)
        value = loss(nets["model"](x)[:, 0], x.mean(dim=(1, 2, 3, 4)))
        update("model", value)
        return value.detach()

    def validate(self, nets, batches, device):
        errors = [float((nets["model"](b["image"])[:, 0] - b["image"].mean(dim=(1, 2, 3, 4))).abs().mean())
                  for b in batches]
        mae = sum(errors) / len(errors)
        return {"mae": mae, "neg_mae": -mae, "monitor": -mae}

    def evaluate(self, data, nets, threshold=None):
        return self.validate(nets, self.test_batches(data), data.device)


def test_a_fifth_task_is_one_class_and_a_registry_entry(preprocessed_store, monkeypatch, tmp_path):
    """Registered under its name, the new task trains through the same ``fit``, run, registry
    and promotion as the built-in ones; inference refuses it with a clear reason."""
    from models.infer import InferConfig, load_predictor, model_info
    from models.run import train_model

    monkeypatch.setitem(TASKS, MeanIntensity.name, MeanIntensity)
    store, version = preprocessed_store
    run = TrainRun(store=store, version=version, name="mean-intensity",
                   train=TrainConfig(task="mean-intensity", **(TINY_TRAIN | {"epochs": 3, "lr": 1e-2})))
    summary = train_model(run, device=torch.device("cpu"))
    assert summary["promoted"] and summary["epochs"] == 3
    assert math.isfinite(summary["test"]["mae"]) and summary["validation"]["monitor"] == -summary["validation"]["mae"]
    config = InferConfig(store=store, name="mean-intensity")
    with pytest.raises(ValueError, match="not mean-intensity"):
        load_predictor(config, model_info(config), torch.device("cpu"))
