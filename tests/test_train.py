"""Training: every model's loss falls; a killed run resumes to the same weights; the registry
promotes only a better model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from models.train import TrainConfig, fit
from voxelflow import registry
from voxelflow.data import patch_dataset

SMALL = dict(patch_size=(16, 32, 32), epochs=4, steps_per_epoch=6, val_steps=3, batch_size=2, channels=(8, 16, 32))


@pytest.fixture(scope="module")
def data(preprocessed_store):
    return preprocessed_store


def _datasets(store, version, task, seed=0):
    kw = dict(class_balanced=True, foreground_oversample=1.0) if task == "classification" \
        else dict(foreground_oversample=0.9)
    train = patch_dataset(store, SMALL["patch_size"], version=version, split="train", samples_per_epoch=48,
                          seed=seed, **kw)
    val = patch_dataset(store, SMALL["patch_size"], version=version, split=None, samples_per_epoch=12, seed=99, **kw)
    return train, val


@pytest.mark.parametrize("task", ["segmentation", "classification", "autoencoder", "gan"])
def test_each_model_trains_and_improves(data, tmp_path, task):
    store, version = data
    config = TrainConfig(task=task, lr=2e-4 if task == "gan" else 1e-3, **SMALL)
    train, val = _datasets(store, version, task)
    result = fit(config, train, val, tmp_path / task, num_classes=3 if task == "segmentation" else 2,
                 class_counts={0: 100, 1: 20, 2: 1} if task == "segmentation" else {0: 4, 1: 1})
    history = result["history"]
    assert len(history) == 4 and all(math.isfinite(h["train_loss"]) for h in history)
    if task == "gan":  # adversarial losses do not fall; the generated statistics approach the real ones
        assert min(h["stat_distance"] for h in history[1:]) < history[0]["stat_distance"]
    else:
        assert min(h["train_loss"] for h in history[1:]) < history[0]["train_loss"]
    assert (tmp_path / task / "best.pt").exists() and (tmp_path / task / "checkpoint.pt").exists()
    assert all(0 <= h["data_wait_share"] <= 1 for h in history)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(data, tmp_path):
    """On the CPU, where every kernel is deterministic (on a GPU the same holds with
    deterministic kernels: tests/test_gpu.py)."""
    store, version = data
    config = TrainConfig(task="segmentation", **SMALL)
    cpu = torch.device("cpu")
    train, val = _datasets(store, version, "segmentation")
    whole = fit(config, train, val, tmp_path / "whole", num_classes=3, device=cpu)
    first = fit(config, train, val, tmp_path / "resumed", num_classes=3, stop_after=2, device=cpu)
    assert first["stopped"] == "interrupted" and len(first["history"]) == 2
    train2, val2 = _datasets(store, version, "segmentation")  # a new process would rebuild them
    second = fit(config, train2, val2, tmp_path / "resumed", num_classes=3, device=cpu)
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["task"]["models"]["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["task"]["models"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in whole["history"]] == [h["train_loss"] for h in second["history"]]


def test_registry_promotes_only_a_better_model(data, tmp_path):
    store, version = data
    snapshot = registry.data_snapshot(store, version)
    for vid, dice in (("v1", 0.5), ("v2", 0.4), ("v3", 0.7)):
        folder = registry.version_dir(store, "seg-test", vid)
        folder.mkdir(parents=True)
        torch.save({"model": {}}, folder / "weights.pt")
        registry.register(store, "seg-test", vid, config={"task": "segmentation"}, snapshot=snapshot,
                          metrics={"validation": {"dice": dice}}, monitor="dice")
    assert registry.promote_if_better(store, "seg-test", "v1") is True
    assert registry.promote_if_better(store, "seg-test", "v2") is False  # worse: current stays
    assert registry.current(store, "seg-test")["version"] == "v1"
    assert registry.promote_if_better(store, "seg-test", "v3") is True
    now = registry.current(store, "seg-test")
    assert (now["version"], now["previous"], now["value"]) == ("v3", "v1", 0.7)
    info = json.loads((registry.version_dir(store, "seg-test", "v3") / "model.json").read_text())
    assert info["data"]["catalog_digest"] == snapshot["catalog_digest"] and info["code"]["package"]
    shutil.rmtree(registry.models_dir(store, "seg-test"))


@pytest.mark.slow
def test_train_flow_registers_and_reports(data, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train import run_train
    from models.run import TrainRun

    store, version = data
    run = TrainRun(store=store, version=version, name="seg-flow",
                   train=TrainConfig(task="segmentation", **{**SMALL, "epochs": 2}))
    summary = run_train(run, n_workers=1)
    assert summary["promoted"] is True and summary["epochs"] == 2
    assert registry.current(store, "seg-flow")["version"] == summary["version"]
    assert 0.0 <= summary["test"]["dice"] <= 1.0 and summary["test"]["volumes"] >= 1
    info = json.loads((registry.version_dir(store, "seg-flow", summary["version"]) / "model.json").read_text())
    assert [h["epoch"] for h in info["metrics"]["history"]] == [1, 2]
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["train-seg-flow-epochs", "train-seg-flow-test", "train-seg-flow-curve"])))}
    assert keys == {"train-seg-flow-epochs", "train-seg-flow-test", "train-seg-flow-curve"}
    # the same run again resumes from its finished checkpoint: no more epochs, same version
    again = run_train(run, n_workers=1)
    assert again["version"] == summary["version"] and again["epochs"] == 2


def test_class_weights():
    from models.tasks import class_weights
    from models.train import weighting

    inv = class_weights({0: 90, 1: 9, 2: 1}, 3, "inverse")
    sq = class_weights({0: 90, 1: 9, 2: 1}, 3, "sqrt")
    assert inv.mean().item() == pytest.approx(1.0) and inv[2] / inv[0] == pytest.approx(90.0)
    assert sq[2] / sq[0] == pytest.approx(90 ** 0.5, rel=1e-5)
    assert weighting(TrainConfig(task="segmentation")) == "none"
    assert weighting(TrainConfig(task="classification")) == "inverse"
    assert weighting(TrainConfig(task="segmentation", class_weighting="sqrt")) == "sqrt"


def test_operating_threshold_from_validation_scores():
    from models.evaluate import operating_threshold
    from models.metrics import classification as classification_metrics, decide

    # separable: the midpoint of the widest gap between the classes
    assert operating_threshold([0.91, 0.95, 0.97, 0.99], [0, 0, 1, 1]) == pytest.approx(0.96)
    # not separable: the threshold with the best F1 (here: catch both positives, one false positive)
    t = operating_threshold([0.2, 0.6, 0.5, 0.9], [0, 0, 1, 1])
    assert 0.2 < t <= 0.5
    assert operating_threshold([0.3, 0.4], [1, 1]) is None  # one class: the argmax rule stays
    probs = torch.tensor([[0.93, 0.07], [0.97, 0.03], [0.2, 0.8]])  # class 0 positive
    assert decide(probs, 0, 0.96).tolist() == [1, 0, 1]
    assert decide(probs, 0, None).tolist() == [0, 0, 1]
    m = classification_metrics(torch.tensor([1, 0, 1]), probs, 2, positive=0, threshold=0.96)
    assert (m["f1"], m["accuracy"]) == (1.0, 1.0)


@pytest.mark.parametrize("pooling,norm", [("max", "batch"), ("avg", "instance"), ("max", "instance")])
def test_classifier_variants_train(data, tmp_path, pooling, norm):
    from models.tasks import build_networks

    store, version = data
    config = TrainConfig(task="classification", pooling=pooling, norm=norm, **SMALL)
    model = build_networks(config, 2)["model"]
    assert isinstance(model.avgpool, torch.nn.AdaptiveMaxPool3d if pooling == "max" else torch.nn.AdaptiveAvgPool3d)
    assert any(isinstance(m, torch.nn.InstanceNorm3d if norm == "instance" else torch.nn.BatchNorm3d)
               for m in model.modules())
    train, val = _datasets(store, version, "classification")
    history = fit(config, train, val, tmp_path / "c", num_classes=2, class_counts={0: 4, 1: 1})["history"]
    assert min(h["train_loss"] for h in history[1:]) < history[0]["train_loss"]


def test_merged_label_values_make_fewer_classes(data):
    """``label_map={2: 1}``: lesions count as liver, in the patches, the class count, the
    validation and the test Dice (LiTS's liver task); other tasks refuse a label map."""
    import numpy as np

    from models.run import TrainRun, _datasets, train_model
    from voxelflow.data import map_labels

    np.testing.assert_array_equal(map_labels(np.array([[0, 1, 2, 3]], np.uint8), {2: 1}), [[0, 1, 1, 3]])
    assert map_labels(np.array([0, 2], np.uint8), None).dtype == np.int64
    store, version = data
    config = TrainConfig(task="segmentation", label_map={2: 1}, **(SMALL | dict(epochs=1, steps_per_epoch=2)))
    run = TrainRun(store=store, version=version, name="seg-merged", train=config)
    train, _ = _datasets(run)
    plain, _ = _datasets(run.model_copy(update={"train": config.replace(label_map={})}))
    train.samples_per_epoch = plain.samples_per_epoch = 64
    values = set()
    for i in range(len(train)):
        merged, original = train[i]["label"], plain[i]["label"]  # the same patches
        assert torch.equal(merged, torch.where(original == 2, 1, original))
        values |= set(original.unique().tolist())
    assert 2 in values  # lesion voxels were there to merge
    summary = train_model(run)
    assert set(k for k in summary["test"] if k.startswith("dice_")) == {"dice_1"}
    folder = registry.version_dir(store, "seg-merged", summary["version"])
    info = json.loads((folder / "model.json").read_text())
    assert TrainConfig(**info["config"]["train"]).label_map == {2: 1}  # JSON keys back to ints
    from models.tasks import build_networks

    model = build_networks(config, 2)["model"]  # background and liver: the weights load into two outputs
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True)["model"])
    # the evaluation merges too: a model that calls every voxel liver scores exactly the Dice of
    # the merged truth (lesions count as hits), not of the liver label alone
    from models import evaluate
    from voxelflow import catalog
    from voxelflow.store import open_label

    class Everywhere(torch.nn.Module):
        def forward(self, x):
            return torch.cat([torch.zeros_like(x), torch.ones_like(x)], 1)

    root = f"{store}/preprocessed/{version}"
    ids = [r["volume_id"] for r in catalog.read_table(root, "preprocessed").to_pylist() if r["label_digest"]]
    truths = [open_label(root, v, "segmentation")[...] for v in ids]
    assert any((t == 2).any() for t in truths)
    got = evaluate.segmentation(Everywhere(), root, ids, (16, 32, 32), 2, torch.device("cpu"), hausdorff=False,
                                label_map={2: 1})["dice_1"]
    want = np.mean([2 * (t > 0).sum() / (t.size + (t > 0).sum()) for t in truths if (t > 0).any()])
    assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="label_map"):
        TrainConfig(task="classification", label_map={2: 1})
    shutil.rmtree(registry.models_dir(store, "seg-merged"))
