"""k-fold cross-validation: patient-disjoint folds inside the train split, each fold a registry
version grouped under one run, and ensemble inference equal to the mean of its members."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import TINY_TRAIN
from voxelflow import catalog, registry


def test_folds_are_patient_disjoint_stratified_and_cover_the_train_split(preprocessed_store):
    from voxelflow.labels import make_folds

    store, _ = preprocessed_store
    splits = catalog.read_table(store, "splits").to_pylist()
    train = {r["volume_id"]: r["patient_key"] for r in splits if r["split"] == "train"}
    folds = make_folds(store, 2, seed=0)
    assert set(folds) == set(train) and set(folds.values()) == {0, 1}
    by_patient: dict[str, set[int]] = {}
    for vid, k in folds.items():
        by_patient.setdefault(train[vid], set()).add(k)
    assert all(len(ks) == 1 for ks in by_patient.values())  # a patient's volumes share a fold
    sizes = np.bincount([next(iter(ks)) for ks in by_patient.values()])
    assert sizes.max() - sizes.min() <= 1  # patients dealt round the folds
    assert make_folds(store, 2, seed=0) == folds  # deterministic
    with pytest.raises(ValueError, match="folds need at least"):
        make_folds(store, len(by_patient) + 1)


def test_a_fold_is_refused_without_enough_folds():
    from models.run import TrainRun

    with pytest.raises(ValueError, match="fold 2 needs folds > 2"):
        TrainRun(store="s", version="v", folds=2, fold=2)
    runs = TrainRun(store="s", version="v", folds=3).fold_runs()
    assert [r.fold for r in runs] == [0, 1, 2] and len({json.dumps(r.identity()) for r in runs}) == 3
    assert len({json.dumps(r.group_identity(), sort_keys=True) for r in runs}) == 1


@pytest.mark.slow
def test_cross_validation_registers_each_fold_and_ensembles_their_mean(preprocessed_store, prefect_server):
    from flows.infer import run_infer
    from flows.train import run_train
    from models.config import TrainConfig
    from models.infer import InferConfig, load_predictor, model_info
    from models.run import TrainRun
    from voxelflow.labels import make_folds
    from voxelflow.store import volume_path

    store, version = preprocessed_store
    run = TrainRun(store=store, version=version, name="seg-cv", folds=2, augment=False,
                   train=TrainConfig(task="segmentation", **TINY_TRAIN))
    summary = run_train(run, n_workers=2)
    assert [r["fold"] for r in summary["table"]] == ["0", "1", "mean", "sd"]
    rows = summary["table"]
    assert rows[2]["test dice"] == pytest.approx(np.mean([rows[0]["test dice"], rows[1]["test dice"]]))
    group = registry.group(store, "seg-cv")
    assert group["group"] == summary["group"] and len(set(group["members"])) == 2
    folds = make_folds(store, 2, seed=0)
    for k, member in enumerate(group["members"]):
        info = json.loads((registry.version_dir(store, "seg-cv", member) / "model.json").read_text())
        assert info["config"]["fold"] == k and info["config"]["folds"] == 2

    # the ensemble's probabilities are the mean of its members'
    cpu = torch.device("cpu")
    config = InferConfig(store=store, name="seg-cv", ensemble="latest")
    info = model_info(config)
    assert info["version"] == group["group"] and info["members"] == group["members"]
    ensemble = load_predictor(config, info, cpu)
    vid = sorted(folds)[0]
    _, image = ensemble.load_image(vid)
    members = [load_predictor(InferConfig(store=store, name="seg-cv", version=v), model_info(
        InferConfig(store=store, name="seg-cv", version=v)), cpu) for v in group["members"]]
    mean = torch.stack([m.probabilities(image) for m in members]).mean(0)
    assert torch.allclose(ensemble.probabilities(image), mean, atol=1e-5)

    # bulk inference with the ensemble records its members (catalog row, label attributes)
    out = run_infer(InferConfig(store=store, name="seg-cv", ensemble="latest", volumes=[vid]), n_workers=1)
    assert out["version"] == group["group"] and out["members"] == group["members"] and out["predicted"] == 1
    row = next(r for r in catalog.read_table(store, "predictions").to_pylist()
               if r["model"] == "seg-cv" and r["volume_id"] == vid)
    assert row["version"] == group["group"] and row["members"] == group["members"]
    label = zarr.open_group(str(volume_path(store, vid) / "labels" / "prediction-seg-cv"), mode="r")
    assert label.attrs["voxelflow"]["members"] == group["members"]
