"""CUDA: training with mixed precision, checkpoints that move between GPU and CPU, a resumed
run that ends with the uninterrupted run's weights, inference that agrees with the CPU's, and
the Dask worker that declares the GPU resource. Skipped where CUDA is absent.

``VOXELFLOW_GPU_TESTS_DRY_RUN=1`` runs the same test code on the CPU (the checks that only mean
something on a GPU, such as the autocast dtype, are left out): a check of the tests
themselves, for a machine without a GPU.
"""

from __future__ import annotations

import math
import os

# cuBLAS is deterministic only with a fixed workspace; it reads this when its first handle is
# made, so set it before any CUDA work of this process (harmless when already set).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from models.networks import autocast  # noqa: E402
from models.run import TrainRun, train_model  # noqa: E402
from models.tasks import build_networks  # noqa: E402
from models.train import TrainConfig, fit  # noqa: E402
from tests.test_train import SMALL, _datasets, data  # noqa: E402,F401 - data: the module's fixture
from voxelflow.data import patch_dataset  # noqa: E402

DRY_RUN = bool(os.environ.get("VOXELFLOW_GPU_TESTS_DRY_RUN"))
GPU = torch.device("cpu" if DRY_RUN else "cuda")
CPU = torch.device("cpu")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(), reason="needs CUDA")]

TINY = dict(SMALL, epochs=2, steps_per_epoch=4, val_steps=2)


def _fit_kwargs(task):
    return dict(num_classes=3 if task == "segmentation" else 2,
                class_counts={0: 100, 1: 20, 2: 1} if task == "segmentation" else {0: 4, 1: 1})


@pytest.fixture
def deterministic():
    """Deterministic CUDA kernels (cuDNN convolutions included) for the length of a test.
    ``warn_only``: nll_loss2d's forward (the cross-entropy term of DiceCELoss) has no
    deterministic CUDA kernel; its value only feeds the logged loss, not the gradients (the
    backward of a mean-reduced loss does not depend on the loss value)."""
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old[2], old[3]


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_training_on_the_gpu_with_mixed_precision(data, tmp_path, task):
    """A few AMP steps on the GPU: the loss falls, the weights stay finite and in float32
    (autocast computes in bf16 / fp16, the master weights do not change dtype), and the best
    checkpoint loads on a CPU machine into a model that gives the GPU model's output."""
    store, version = data
    config = TrainConfig(task=task, amp=True, lr=1e-3, **SMALL)
    train, val = _datasets(store, version, task)
    result = fit(config, train, val, tmp_path / task, device=GPU, **_fit_kwargs(task))
    history = result["history"]
    assert len(history) == 4 and all(math.isfinite(h["train_loss"]) for h in history)
    assert min(h["train_loss"] for h in history[1:]) < history[0]["train_loss"]
    model = result["models"]["model"]
    assert all(p.device.type == GPU.type and p.dtype == torch.float32 and torch.isfinite(p).all()
               for p in model.parameters())
    x = next(iter(torch.utils.data.DataLoader(train, batch_size=2)))["image"]
    if not DRY_RUN:
        model.eval()
        with torch.no_grad(), autocast(GPU, True):
            assert model(x.to(GPU)).dtype in (torch.bfloat16, torch.float16)  # AMP is really on

    best = torch.load(tmp_path / task / "best.pt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" and torch.isfinite(t.float()).all() for t in best["model"].values())
    on_cpu = build_networks(config, _fit_kwargs(task)["num_classes"])["model"]
    on_cpu.load_state_dict(best["model"])
    on_gpu = build_networks(config, _fit_kwargs(task)["num_classes"])["model"].to(GPU)
    on_gpu.load_state_dict(best["model"])
    on_cpu.eval(), on_gpu.eval()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want = on_cpu(x)
        got = on_gpu(x.to(GPU)).cpu()  # float32 both (no autocast, no TF32): equal up to summation order
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_a_killed_gpu_run_resumes_to_the_uninterrupted_weights(data, tmp_path, deterministic):
    """Kill after epoch 2, resume to epoch 4, on the GPU: the same weights, bit for bit, as a run
    that was never interrupted. Exact equality holds because the patches depend only on
    (seed, epoch, index), the checkpoint restores optimiser, schedule, scaler and the CPU and
    CUDA RNG states (dropout), and the kernels are deterministic (fixture ``deterministic``)."""
    store, version = data
    config = TrainConfig(task="segmentation", amp=True, **SMALL)
    train, val = _datasets(store, version, "segmentation")
    whole = fit(config, train, val, tmp_path / "whole", device=GPU, num_classes=3)
    first = fit(config, train, val, tmp_path / "resumed", device=GPU, num_classes=3, stop_after=2)
    assert first["stopped"] == "interrupted" and len(first["history"]) == 2
    train2, val2 = _datasets(store, version, "segmentation")  # a new process would rebuild them
    second = fit(config, train2, val2, tmp_path / "resumed", device=GPU, num_classes=3)
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", map_location="cpu", weights_only=False)["task"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", map_location="cpu", weights_only=False)["task"]
    wa, wb = a["models"]["model"], b["models"]["model"]
    assert wa.keys() == wb.keys()
    diff = {k: float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diff, f"weights differ after resuming: {diff}"
    assert a["scaler"] == b["scaler"]
    # the logged loss: equal up to the one nondeterministic reduction (nll_loss2d's forward)
    assert [h["train_loss"] for h in whole["history"]] == pytest.approx([h["train_loss"] for h in second["history"]],
                                                                        rel=1e-5)


@pytest.mark.parametrize("first,then", [("gpu", "cpu"), ("cpu", "gpu")])
def test_a_run_moves_between_gpu_and_cpu(data, tmp_path, first, then):
    """A run interrupted on one kind of worker resumes on the other: a Dask cluster may hand
    the resumed task to a CPU worker, or a CPU-started run to a GPU worker. The checkpoint
    holds CUDA tensors (or none) and a GradScaler state (or an empty one from the CPU's
    disabled scaler)."""
    store, version = data
    devices = {"gpu": GPU, "cpu": CPU}
    config = TrainConfig(task="classification", amp=True, **SMALL)
    train, val = _datasets(store, version, "classification")
    out = fit(config, train, val, tmp_path / "run", device=devices[first], stop_after=2,
              **_fit_kwargs("classification"))
    assert out["stopped"] == "interrupted"
    rest = fit(config, train, val, tmp_path / "run", device=devices[then], **_fit_kwargs("classification"))
    assert [h["epoch"] for h in rest["history"]] == [1, 2, 3, 4] and rest["stopped"] in ("completed", "early")
    assert all(math.isfinite(h["train_loss"]) for h in rest["history"])
    assert all(p.device.type == devices[then].type for p in rest["models"]["model"].parameters())


def test_on_the_fly_augmentation_in_loader_workers_once_cuda_is_initialised(data):
    """DataLoader workers are forked from a process whose CUDA is initialised (the model is on
    the GPU); on-the-fly augmentation must not touch CUDA there, and gives the patches of the
    main process."""
    from voxelflow.augment import AugmentConfig, OnTheFly
    from voxelflow.data import make_loader

    store, version = data
    torch.zeros(1, device=GPU)  # as a model moved to the GPU does
    ds = patch_dataset(store, (16, 24, 24), version=version, split="train", samples_per_epoch=4,
                       transform=OnTheFly(AugmentConfig(elastic_prob=0.5), seed=3))
    serial = list(make_loader(ds, batch_size=2, num_workers=0))
    parallel = list(make_loader(ds, batch_size=2, num_workers=2))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a["image"], b["image"], atol=1e-4, rtol=1e-4)
        assert torch.equal(a["label"], b["label"])


@pytest.fixture(scope="module")
def trained(data):
    """A segmentation and a lesion classifier trained (and registered) on the GPU, the
    classifier with on-the-fly augmentation in two DataLoader workers."""
    store, version = data
    summaries = {}
    for task in ("segmentation", "classification"):
        detect = dict(positive_class="lesion", positive_label=2, num_workers=2) if task == "classification" else {}
        summaries[task] = train_model(TrainRun(store=store, version=version, name=f"gpu-{task}",
                                               train=TrainConfig(task=task, **TINY, **detect)), device=GPU)
    return store, summaries


def test_train_model_on_the_gpu_registers_and_evaluates(trained):
    store, summaries = trained
    for task, s in summaries.items():
        assert s["device"] == str(GPU) and s["epochs"] == TINY["epochs"]
        assert s["test"]["volumes"] >= 1
        key = "dice" if task == "segmentation" else "roc_auc"
        assert s["test"][key] is not None


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_gpu_inference_agrees_with_the_cpu(trained, task):
    """The same registered model on the GPU (bf16 autocast, as inference runs there) and the
    CPU (float32): segmentation labels agree on almost every voxel, class probabilities within
    bf16's precision."""
    from models import infer
    from models.infer import InferConfig

    store, _ = trained
    config = InferConfig(store=store, name=f"gpu-{task}", explain="none")
    info = infer.model_info(config)
    on_cpu, on_gpu = infer.load_predictor(config, info, CPU), infer.load_predictor(config, info, GPU)
    assert next(on_gpu.model.parameters()).device.type == GPU.type
    todo, done = infer.plan(config, info)
    volumes = sorted(todo + done)[:3]

    def probabilities(predictor, image):
        p = predictor.probabilities(image)
        return p.cpu().numpy() if isinstance(p, torch.Tensor) else p

    for vid in volumes:
        _, image = on_cpu.load_image(vid)
        p_cpu, p_gpu = probabilities(on_cpu, image), probabilities(on_gpu, image)
        assert p_gpu.shape == p_cpu.shape and np.isfinite(p_gpu).all()
        if task == "segmentation":
            assert (p_gpu.argmax(0) == p_cpu.argmax(0)).mean() > 0.99
            assert np.abs(p_gpu - p_cpu).mean() < 0.01
        else:
            np.testing.assert_allclose(p_gpu, p_cpu, atol=0.03)
            assert abs(p_gpu.sum() - 1) < 1e-5


def test_bulk_inference_on_the_gpu_pipeline_equals_one_volume_at_a_time(trained):
    """On CUDA ``infer_volumes`` overlaps reading, the model and writing by default; its rows
    are those of the plain loop on the same device."""
    from models import infer
    from models.infer import InferConfig

    store, _ = trained
    for name in ("gpu-segmentation", "gpu-classification"):
        config = InferConfig(store=store, name=name, explain="none")
        info = infer.model_info(config)
        predictor = infer.load_predictor(config, info, GPU)
        todo, done = infer.plan(config, info)
        volumes = sorted(todo + done)[:3]
        # on CUDA the default (None) is the pipeline; the dry run asks for it
        rows, lesions = infer.infer_volumes(predictor, volumes, pipeline=True if DRY_RUN else None)
        for i, vid in enumerate(volumes):
            row, les = infer.infer_volume(predictor, vid)
            assert rows[i]["volume_id"] == vid and rows[i]["prediction"] == row["prediction"]
            np.testing.assert_allclose(rows[i]["probabilities"], row["probabilities"], rtol=1e-5, atol=1e-6)
            assert len([x for x in lesions if x["volume_id"] == vid]) == len(les)


def test_gradcam_on_the_gpu_matches_the_cpu(trained):
    from models import infer
    from models.explain import gradcam_volume
    from models.infer import InferConfig

    store, _ = trained
    config = InferConfig(store=store, name="gpu-classification")
    info = infer.model_info(config)
    on_cpu, on_gpu = infer.load_predictor(config, info, CPU), infer.load_predictor(config, info, GPU)
    vid = sorted(sum(infer.plan(config, info), []))[0]
    _, image = on_cpu.load_image(vid)
    patch = on_cpu.train.sampling.patch_size
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        a = gradcam_volume(on_cpu.model, image, patch, 0)
        b = gradcam_volume(on_gpu.model, image.to(GPU), patch, 0)
    assert a.shape == b.shape == tuple(image.shape[-3:])
    assert np.abs(a - b).max() < 1e-2 or np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_training_runs_on_the_dask_worker_with_the_gpu_resource(data):
    """The local cluster the flows start declares ``GPU=1`` on a GPU machine, and a training
    task annotated with that resource runs there, on CUDA."""
    distributed = pytest.importorskip("distributed")
    from flows.runtime import local_cluster, local_gpus

    store, version = data

    def worker_view():  # nested: cloudpickle sends it by value (the worker cannot import this module)
        import torch
        from distributed import get_worker

        w = get_worker()
        return {"resources": dict(w.state.total_resources), "cuda": torch.cuda.is_available()}

    if not DRY_RUN:
        assert local_gpus() >= 1  # /dev/nvidia0 ...: what the flows look at without importing CUDA
    kwargs = {} if not DRY_RUN else {"resources": {"GPU": 1}}
    cluster = local_cluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", **kwargs)
    with cluster, distributed.Client(cluster) as client:
        view = client.submit(worker_view, resources={"GPU": 1}, pure=False).result(timeout=120)
        assert view["resources"] == {"GPU": 1} and view["cuda"] is (not DRY_RUN)
        run = TrainRun(store=store, version=version, name="gpu-dask", augment=False,
                       train=TrainConfig(task="segmentation", **TINY))
        summary = client.submit(train_model, run, resources={"GPU": 1}, pure=False).result(timeout=600)
    assert summary["device"] == ("cuda" if not DRY_RUN else "cpu") and summary["epochs"] == TINY["epochs"]
