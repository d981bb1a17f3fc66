"""Plans configured from the data: the fingerprint of a store's labelled volumes, nnU-Net's
rules for spacing, patch, batch and depth within a memory budget, explicit settings winning
field by field, and the train flow planning what a run leaves open."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.config import TrainConfig
from models.plan import (
    MIN_BATCH,
    apply,
    estimate_bytes,
    explicit_settings,
    make_plan,
    needs_plan,
)
from tests.conftest import TINY_TRAIN, run_cli
from voxelflow import catalog, registry
from voxelflow.fingerprint import Fingerprint, IntensityStats, fingerprint, target_spacing

GiB = 2 ** 30


def _ct_fingerprint(n: int = 40) -> Fingerprint:
    """An abdominal CT archive's facts: 0.8 mm in-plane, half 1 mm and half 2.5 mm slices."""
    return Fingerprint(
        store="s", label_name="segmentation", version=None, volumes=tuple(f"v{i}" for i in range(n)),
        modalities=("CT",) * n, spacings=tuple((0.8, 0.8, 2.5 if i % 2 else 1.0) for i in range(n)),
        shapes=tuple((300 if i % 2 else 600, 512, 512) for i in range(n)),
        intensity={"CT": IntensityStats(mean=90.0, sd=40.0, median=95.0, p00_5=-60.0, p99_5=230.0, voxels=10 ** 5)},
        class_voxels={0: 10 ** 9, 1: 10 ** 7, 2: 10 ** 5})


def test_target_spacing_is_the_median_unless_one_axis_is_much_coarser():
    assert target_spacing([(1.0, 1.0, 2.0), (0.8, 0.8, 3.0), (0.9, 0.9, 2.5)],
                          [(100, 256, 256)] * 3) == (0.9, 0.9, 2.5)
    # thick slices (5 mm at 0.7 mm in-plane, few of them): the 10th percentile, not the median
    spacings = [(0.7, 0.7, 5.0)] * 8 + [(0.7, 0.7, 3.0)] * 2
    shapes = [(30, 512, 512)] * 10
    got = target_spacing(spacings, shapes)
    assert got[:2] == (0.7, 0.7) and got[2] == pytest.approx(3.0)
    # coarse but with many voxels on that axis: the median stays
    assert target_spacing(spacings, [(400, 512, 512)] * 10)[2] == 5.0


def test_the_fingerprint_of_a_store_is_deterministic_and_counts_the_foreground(labelled_store):
    fp = fingerprint(labelled_store)
    assert fp == fingerprint(labelled_store) and fp.digest() == fingerprint(labelled_store).digest()
    labels = [r for r in catalog.read_table(labelled_store, "labels").to_pylist() if r["name"] == "segmentation"]
    assert set(fp.volumes) == {r["volume_id"] for r in labels}
    assert sum(fp.class_voxels.values()) == sum(sum(r["voxels"]) for r in labels)
    ct = fp.intensity["CT"]
    # the synthetic liver and lesions sit between 0 and 200 HU; air and bone are not foreground
    assert 0 < ct.p00_5 < ct.median < ct.p99_5 < 250 and ct.voxels > 0
    few = fingerprint(labelled_store, samples_per_volume=50)
    assert few.intensity["CT"].voxels == 50 * len(fp.volumes) and few.class_voxels == fp.class_voxels


def test_the_plan_is_deterministic_and_fits_the_memory_budget():
    fp = _ct_fingerprint()
    plans = {gb: make_plan(fp, memory=(gb * GiB, f"{gb} GiB")) for gb in (2, 8, 24)}
    assert make_plan(fp, memory=(8 * GiB, "8 GiB")) == plans[8]
    assert plans[8].plan_id() == make_plan(fp, memory=(8 * GiB, "8 GiB")).plan_id()
    median = fp.median_shape()
    for gb, p in plans.items():
        assert p.estimated_bytes <= 0.85 * gb * GiB
        assert all(s <= m for s, m in zip(p.patch_size, median))
        step = 2 ** (len(p.channels) - 1)
        assert all(s % step == 0 and s // step >= 4 for s in p.patch_size), (p.patch_size, p.channels)
        assert p.batch_size >= MIN_BATCH and p.spacing == fp.target_spacing()
        assert p.ct_window == (-60.0, 230.0) and p.mr_normalization == "zscore"
        # the estimate is what was planned: the configuration it describes costs that much
        config = TrainConfig().replace(**p.train_settings())
        assert estimate_bytes(config, 3) == p.estimated_bytes
    # more memory: never a smaller patch or batch
    volumes = [math.prod(plans[gb].patch_size) * plans[gb].batch_size for gb in (2, 8, 24)]
    assert volumes == sorted(volumes) and volumes[0] < volumes[-1]
    assert plans[2].channels[0] == 32 and max(plans[24].channels) <= 320
    with pytest.raises(ValueError, match="more than"):
        make_plan(fp, memory=(2 ** 20, "1 MiB"))


def test_a_small_dataset_caps_the_batch_at_five_percent_of_its_voxels():
    fp = _ct_fingerprint(2)
    p = make_plan(fp, memory=(80 * GiB, "80 GiB"))
    assert p.batch_size * math.prod(p.patch_size) <= max(MIN_BATCH * math.prod(p.patch_size),
                                                         0.05 * fp.total_voxels())


def test_the_meta_count_is_what_autograd_saves_on_a_real_forward():
    """The memory estimate's main term, counted on the meta device, against the same network's
    forward pass on the CPU with real tensors."""
    config = TrainConfig(**{**TINY_TRAIN, "batch_size": 2})
    from models.tasks import task_for

    net = task_for(config, 3).networks()["model"]
    saved = 0

    def count(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        net(torch.randn(2, 1, *config.sampling.patch_size))
    params = sum(p.numel() * 4 for p in net.parameters())
    estimate = estimate_bytes(config, 3)
    x = 2 * math.prod(config.sampling.patch_size) * 4
    out = 3 * x  # 3 classes
    assert estimate == int(2.0 * saved + 2 * x + 3 * out + 4 * params)


def test_explicit_settings_win_field_by_field():
    fp = _ct_fingerprint()
    assert needs_plan(TrainConfig()) and not needs_plan(TrainConfig(**TINY_TRAIN))
    assert not needs_plan(TrainConfig(task="classification"))  # not a planned task
    given = TrainConfig(patch_size=(64, 96, 96), lr=3e-4)
    assert explicit_settings(given) == {"patch_size": (64, 96, 96)}
    assert explicit_settings(TrainConfig(sampling={"batch_size": 4})) == {"batch_size": 4}
    plan = make_plan(fp, memory=(8 * GiB, "8 GiB"), base=given, fixed=explicit_settings(given))
    assert plan.patch_size == (64, 96, 96) and plan.channels == (32, 64, 128, 256, 320)
    planned = apply(given, plan)
    assert planned.sampling.patch_size == (64, 96, 96) and planned.optimisation.lr == 3e-4
    assert planned.sampling.batch_size == plan.batch_size and planned.network.channels == plan.channels
    # a plan made without knowing the user's patch still loses to it when applied
    free = make_plan(fp, memory=(8 * GiB, "8 GiB"))
    assert free.patch_size != (64, 96, 96) and apply(given, free).sampling.patch_size == (64, 96, 96)
    # a planned configuration is explicit in every field: planning it again changes nothing
    assert not needs_plan(planned)
    # a batch given: kept, however much memory is left
    keep = make_plan(fp, memory=(80 * GiB, "80 GiB"), fixed={"batch_size": 2})
    assert keep.batch_size == 2
    # a patch too large for the memory is not shrunk behind the user's back
    with pytest.raises(ValueError, match="patch \\(128, 256, 256\\)"):
        make_plan(fp, memory=(2 * GiB, "2 GiB"), fixed={"patch_size": (128, 256, 256)})


def test_voxelflow_plan_saves_the_plan_with_its_fingerprint(preprocessed_store, tmp_path):
    store, version = preprocessed_store
    proc = run_cli("plan", store, "--memory-gb", "4", "--json", tmp_path / "plan.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert registry.load_plan(store, plan["plan_id"])["fingerprint"] == plan["fingerprint"]
    assert plan["memory_bytes"] == 4 * GiB and "patch size" in proc.stdout and plan["plan_id"] in proc.stdout
    assert plan["fingerprint_facts"]["fingerprint"] == plan["fingerprint"]
    # for the preprocessed copy's grid, with a patch given
    proc = run_cli("plan", store, "--version", version, "--memory-gb", "4", "--set", "patch_size=[16,32,32]",
                   "--json", tmp_path / "copy.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert copy["patch_size"] == [16, 32, 32] and copy["spacing"] == [2.0, 2.0, 3.0]
    proc = run_cli("plan", store, "--memory-gb", "0.001")
    assert proc.returncode == 2 and "more than" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_train_flow_plans_what_the_run_leaves_open(preprocessed_store, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train import run_train
    from models.run import TrainRun

    store, version = preprocessed_store
    settings = {k: v for k, v in TINY_TRAIN.items() if k not in ("batch_size", "channels")}
    run = TrainRun(store=store, version=version, name="seg-planned", augment=False,
                   train=TrainConfig(task="segmentation", **{**settings, "epochs": 1}))
    summary = run_train(run, n_workers=1)
    info = json.loads((registry.version_dir(store, "seg-planned", summary["version"]) / "model.json").read_text())
    plan = registry.load_plan(store, info["config"]["plan"])
    assert summary["plan"] == plan["plan_id"]
    train = info["config"]["train"]
    assert train["sampling"]["patch_size"] == TINY_TRAIN["patch_size"]  # given: kept
    assert train["sampling"]["batch_size"] == plan["batch_size"] and train["network"]["channels"] == plan["channels"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["train-seg-planned-plan"])))
    assert artifacts and plan["plan_id"] in artifacts[0].description


@pytest.mark.slow
def test_voxelflow_preprocess_takes_the_plans_spacing_and_ct_window(labelled_store, tmp_path, prefect_server):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(labelled_store, store, ignore=shutil.ignore_patterns("preprocessed", "models", "plans", "qc"))
    proc = run_cli("plan", store, "--memory-gb", "1", "--json", tmp_path / "plan.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    proc = run_cli("preprocess", store, "--labelled-only", "--plan", plan["plan_id"], "--workers", "1",
                   env={"VOXELFLOW_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    from voxelflow.preprocess import PreprocessConfig

    made = PreprocessConfig(store=str(store), spacing=tuple(plan["spacing"]), ct_window=tuple(plan["ct_window"]),
                            mr_normalization=plan["mr_normalization"])
    assert f"version {made.version()}" in proc.stdout  # the plan's spacing and window define the copy
    assert tuple(plan["ct_window"]) != PreprocessConfig(store="s").ct_window  # the window is the data's
    rows = catalog.preprocessed_volumes(store, made.version())
    assert rows and all(r["spacing"] == pytest.approx(plan["spacing"], abs=1e-3) for r in rows)
