"""Bulk inference: predictions land on the original volume's grid with provenance, volumes
already predicted are skipped, NIfTI exports match, lesions are measured consistently."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr

from tests.conftest import TINY_TRAIN
from models.run import TrainRun, train_model
from models.train import TrainConfig
from voxelflow import catalog, registry, store as st
from voxelflow.export import export_label
from models.infer import InferConfig, run_local

TINY = TINY_TRAIN | {"steps_per_epoch": 4}


@pytest.fixture(scope="module")
def trained(preprocessed_store):
    store, version = preprocessed_store
    detect = dict(positive_class="lesion", positive_label=2)  # patch targets from the lesion label
    for task in ("segmentation", "classification"):
        train_model(TrainRun(store=store, version=version, name=f"infer-{task}",
                             train=TrainConfig(task=task, **TINY, **(detect if task == "classification" else {}))))
    # a 2-D slice classifier: patches one slice deep, a stride-2 stem
    train_model(TrainRun(store=store, version=version, name="infer-planar",
                         train=TrainConfig(task="classification", **(TINY | dict(patch_size=(1, 32, 32), batch_size=8)),
                                           stem_stride=2, **detect)))
    return store


def test_segmentation_predictions_land_on_the_original_grid_with_provenance(trained, tmp_path):
    store = trained
    summary = run_local(InferConfig(store=store, name="infer-segmentation", split="test"))
    assert summary["predicted"] >= 1
    rows = [r for r in catalog.read_table(store, "predictions").to_pylist() if r["model"] == "infer-segmentation"]
    for row in rows:
        original = st.open_volume(store, row["volume_id"])
        label = st.open_label(store, row["volume_id"], "prediction-infer-segmentation")
        assert label.shape == original.array.shape[-3:]
        attrs = zarr.open_group(str(st.volume_path(store, row["volume_id"]) / "labels" /
                                    "prediction-infer-segmentation"), mode="r").attrs["voxelflow"]
        assert attrs["model"] == "infer-segmentation" and attrs["version"] == row["version"]
        out = export_label(store, row["volume_id"], "prediction-infer-segmentation", tmp_path / f"{row['volume_id']}.nii.gz")
        img = nib.load(out)
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.transpose(label[...], (2, 1, 0)))
        np.testing.assert_allclose(img.affine, original.affine, atol=1e-5)
    again = run_local(InferConfig(store=store, name="infer-segmentation", split="test"))
    assert (again["predicted"], again["skipped"]) == (0, summary["predicted"])


def test_a_changed_volume_is_predicted_again(trained):
    """Skip-if-done is by content: a prediction made from other voxels (the volume was
    re-ingested or re-preprocessed since) does not count, nor does a row from a catalog written
    before predictions recorded their input."""
    import pyarrow as pa

    from models import infer

    store = trained
    config = InferConfig(store=store, name="infer-segmentation", split="test")
    run_local(config)
    info = infer.model_info(config)
    todo, done = infer.plan(config, info)
    assert todo == [] and done
    table = catalog.read_table(store, "predictions")
    rows = table.to_pylist()
    changed = next(r for r in rows if r["model"] == "infer-segmentation" and r["volume_id"] == done[0])
    changed["input_digest"] = "0" * 16
    old = pa.Table.from_pylist(rows, schema=catalog.PREDICTION_SCHEMA)
    catalog.write_table(store, "predictions", old.drop_columns(["input_digest"]))  # an older catalog
    assert sorted(infer.plan(config, info)[0]) == sorted(done)  # nothing recorded: all predicted again
    catalog.write_table(store, "predictions", old)
    assert infer.plan(config, info)[0] == [done[0]]
    assert run_local(config)["predicted"] == 1
    assert infer.plan(config, info)[0] == []


def test_classification_probabilities_in_the_catalog(trained):
    store = trained
    summary = run_local(InferConfig(store=store, name="infer-classification"))
    rows = [r for r in catalog.read_table(store, "predictions").to_pylist() if r["model"] == "infer-classification"]
    assert len(rows) == summary["predicted"] > 0
    for r in rows:
        assert abs(sum(r["probabilities"]) - 1) < 1e-5 and r["prediction"] in r["classes"]
        assert r["classes"] == ["lesion", "no_lesion"]
    info = json.loads((registry.version_dir(store, "infer-classification", rows[0]["version"]) / "model.json").read_text())
    assert info["config"]["classes"] == ["lesion", "no_lesion"]
    test = info["metrics"]["test"]  # whole test volumes, with patch metrics alongside
    assert test["volumes"] >= 1 and sum(map(sum, test["confusion"])) == test["volumes"] and test["patch_samples"] >= 8
    # the operating threshold tuned on the best validation epoch is recorded and decides
    threshold = info["config"]["threshold"]
    assert threshold == info["metrics"]["validation"]["threshold"]
    for r in rows:
        p_lesion = r["probabilities"][0]
        lesion = p_lesion >= threshold if threshold is not None else p_lesion >= r["probabilities"][1]
        assert r["prediction"] == ("lesion" if lesion else "no_lesion")


def test_volume_classes_come_from_their_windows(tmp_path):
    """A bright spot in one corner of one volume: only one sliding window sees it, and the
    volume is positive because its largest window probability is."""
    import torch

    from models.evaluate import classification_volumes, volume_probabilities

    class Spot(torch.nn.Module):  # "lesion" when a window holds a voxel above 0.9
        def forward(self, x):
            hit = (x.flatten(1).max(1).values > 0.9).float()
            return torch.stack([10 * hit - 5, torch.zeros_like(hit)], 1)

    root = tmp_path / "store"
    st.init_store(root)
    for i, corner in enumerate([(0, 0, 0), None, (-1, -1, -1)]):
        data = np.full((20, 40, 40), 0.5, np.float32)
        if corner is not None:
            data[corner] = 1.0
        st.write_volume(root, f"v{i}", data, np.eye(4))
    out = classification_volumes(Spot(), str(root), ["v0", "v1", "v2"], [0, 1, 0], 2, (16, 16, 16),
                                 torch.device("cpu"), positive=0)
    assert out["confusion"] == [[2, 0], [0, 1]] and out["f1"] == 1.0 and out["volumes"] == 3
    windows = np.array([[0.2, 0.8], [0.7, 0.3], [0.1, 0.9]])
    np.testing.assert_allclose(volume_probabilities(windows, 0), [0.7, 0.3])
    np.testing.assert_allclose(volume_probabilities(windows, None), windows.mean(0))


def test_lesion_table_measures_components():
    pred = np.zeros((10, 10, 10), np.uint8)
    pred[1:3, 1:3, 1:3] = 2  # 8 voxels
    pred[6:9, 6:8, 5:6] = 2  # 6 voxels
    probs = np.zeros((3, 10, 10, 10), np.float32)
    probs[2][pred == 2] = 0.7
    probs[2, 7, 7, 5] = 0.95
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    from models.lesions import components

    rows = components(pred, probs, affine, "v", "m", "1")
    assert sorted(r["voxels"] for r in rows) == [6, 8]
    big = next(r for r in rows if r["voxels"] == 8)
    assert big["volume_ml"] == pytest.approx(8 * 12 / 1000)
    assert big["centroid_mm"] == pytest.approx([3.0, 3.0, 4.5])  # (x, y, z) of index centre (1.5, 1.5, 1.5)
    assert big["bbox_min_mm"] == pytest.approx([2.0, 2.0, 3.0]) and big["bbox_max_mm"] == pytest.approx([4.0, 4.0, 6.0])
    assert next(r for r in rows if r["voxels"] == 6)["max_probability"] == pytest.approx(0.95)


@pytest.mark.parametrize("name", ["infer-segmentation", "infer-classification", "infer-planar"])
def test_torchscript_and_onnx_exports_match_pytorch(trained, name):
    from models.export import export_model
    from voxelflow import registry

    folder = registry.version_dir(trained, name, registry.current(trained, name)["version"])
    results = export_model(folder)
    assert set(results) == {"torchscript", "onnx"}
    for r in results.values():
        assert r["max_abs_diff"] <= 1e-4 and __import__("os").path.exists(r["path"])


def test_export_without_parity_is_refused(trained, monkeypatch):
    from models import export
    from voxelflow import registry

    folder = registry.version_dir(trained, "infer-segmentation", registry.current(trained, "infer-segmentation")["version"])
    real = export._check
    monkeypatch.setattr(export, "_check", lambda path, got, want, atol: real(path, got + 1.0, want, atol))
    with pytest.raises(export.ParityError, match=r"model\..*differs from the PyTorch model by 1"):
        export.export_model(folder, formats=("onnx",))
    assert not (folder / "model.onnx").exists()


def test_classifier_saliency_is_stored_with_a_qc_image(trained):
    from pathlib import Path

    import pyarrow as pa

    def rows_of():
        return [r for r in catalog.read_table(trained, "predictions").to_pylist() if r["model"] == "infer-classification"]

    if not rows_of():
        run_local(InferConfig(store=trained, name="infer-classification"))
    # default: Grad-CAM for the volumes predicted positive only
    assert all((r["qc_image"] is not None) == (r["prediction"] == "lesion") for r in rows_of())
    others = [r for r in catalog.read_table(trained, "predictions").to_pylist() if r["model"] != "infer-classification"]
    catalog.write_table(trained, "predictions", pa.Table.from_pylist(others, schema=catalog.PREDICTION_SCHEMA))
    run_local(InferConfig(store=trained, name="infer-classification", split="test", explain="all"))
    rows = rows_of()
    assert rows and all(r["qc_image"] for r in rows)
    png = Path(rows[0]["qc_image"])
    assert png.suffix == ".png" and png.exists()
    saliency_store = png.parent
    sal = st.open_volume(saliency_store, rows[0]["volume_id"])
    pre = st.open_volume(saliency_store.parents[1], rows[0]["volume_id"])
    assert sal.array.shape == pre.array.shape
    np.testing.assert_allclose(sal.affine, pre.affine)
    values = sal.array[...]
    assert values.min() >= 0 and values.max() == pytest.approx(1.0)


def test_a_slice_classifier_classifies_and_explains_whole_volumes(trained):
    """A classifier on patches one slice deep is a 2-D network (``Planar``); inference slides
    it over every slice and Grad-CAM explains each slice, on the preprocessed volume's grid."""
    import json as _json
    from pathlib import Path

    from models.evaluate import volume_scores, window_probabilities
    from models.networks import Planar
    from models.tasks import build_networks

    current = registry.current(trained, "infer-planar")
    folder = registry.version_dir(trained, "infer-planar", current["version"])
    info = _json.loads((folder / "model.json").read_text())
    config = TrainConfig(**info["config"]["train"])
    model = build_networks(config, 2)["model"]
    assert isinstance(model, Planar) and isinstance(model.net.conv1, torch.nn.Conv2d)
    assert model.net.conv1.stride == (2, 2)
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True)["model"])
    pre_root = f"{trained}/preprocessed/{info['config']['version']}"
    vid = next(r["volume_id"] for r in catalog.read_table(pre_root, "preprocessed").to_pylist() if r["status"] == "done")
    vol = st.open_volume(pre_root, vid)
    image = torch.from_numpy(np.ascontiguousarray(vol.array[...], dtype=np.float32))[None, None]
    z, y, x = image.shape[2:]
    windows = window_probabilities(model, image, config.sampling.patch_size, torch.device("cpu"))
    steps = [len(range(0, max(n - 32, 0) + 16, 16)) if n > 32 else 1 for n in (y, x)]
    assert windows.shape == (z * steps[0] * steps[1], 2)  # every slice, windows overlapping by half in-plane
    model.eval()
    with torch.no_grad():  # the first window: slice 0, corner (0, 0), as the 2-D network sees it
        first = torch.softmax(model.net(image[:, :, 0, :32, :32]), 1)[0].numpy()
    np.testing.assert_allclose(windows[0], first, atol=1e-5)
    positive = info["config"]["classes"].index("lesion")
    score = volume_scores(model, pre_root, [vid], config.sampling.patch_size, torch.device("cpu"), positive)[0, positive]
    assert score == pytest.approx(windows[:, positive].max())

    summary = run_local(InferConfig(store=trained, name="infer-planar", volumes=[vid], explain="all"))
    assert summary["predicted"] == 1
    row = next(r for r in catalog.read_table(trained, "predictions").to_pylist()
               if r["model"] == "infer-planar" and r["volume_id"] == vid)
    sal = st.open_volume(Path(row["qc_image"]).parent, vid)
    assert sal.array.shape == vol.array.shape and Path(row["qc_image"]).exists()
    values = sal.array[...]
    assert values.min() >= 0 and values.max() == pytest.approx(1.0)


def test_patches_one_slice_deep_are_for_classifiers():
    with pytest.raises(ValueError, match="one voxel deep"):
        TrainConfig(task="segmentation", patch_size=(1, 64, 64))


@pytest.mark.slow
def test_infer_flow_on_dask_with_qc_artifact(trained, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.infer import run_infer

    summary = run_infer(InferConfig(store=trained, name="infer-classification", split="validation", explain="all"),
                        n_workers=1)
    assert summary["predicted"] + summary["skipped"] >= 1
    if summary["predicted"]:
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["explain-infer-classification", "infer-infer-classification"])))
        assert {"explain-infer-classification", "infer-infer-classification"} <= {a.key for a in arts}
        explain = next(a for a in arts if a.key == "explain-infer-classification")
        assert "data:image/png;base64," in explain.data


def test_keep_largest_component():
    from models.evaluate import keep_largest

    pred = np.zeros((6, 6, 6), np.uint8)
    pred[0:3, 0:3, 0:3] = 1  # the organ
    pred[5, 5, 5] = 1  # a stray voxel
    pred[1, 1, 1] = 2  # a lesion inside stays
    pred[5, 0, 0] = 2  # lesions are not post-processed
    out = keep_largest(pred, (1,))
    assert out[5, 5, 5] == 0 and (out == 1).sum() == 26 and out[1, 1, 1] == 2 and out[5, 0, 0] == 2
    assert keep_largest(pred, ()) is pred


def test_pipelined_inference_equals_one_volume_at_a_time(trained):
    """The reader / model / writer pipeline gives the rows, lesions and labels of the plain loop."""
    import torch

    from models import infer

    store = trained
    device = torch.device("cpu")
    for name in ("infer-segmentation", "infer-classification"):
        config = InferConfig(store=store, name=name, explain="none")
        info = infer.model_info(config)
        predictor = infer.load_predictor(config, info, device)
        todo, done = infer.plan(config, info)
        volumes = sorted(todo + done)[:3]
        rows, lesions = infer.infer_volumes(predictor, volumes, pipeline=True)
        labels = {v: st.open_label(store, v, f"prediction-{name}")[...] for v in volumes} \
            if predictor.train.task == "segmentation" else {}
        for i, vid in enumerate(volumes):
            row, les = infer.infer_volume(predictor, vid)
            assert rows[i]["volume_id"] == vid
            np.testing.assert_allclose(rows[i]["probabilities"], row["probabilities"], rtol=1e-6)
            assert rows[i]["prediction"] == row["prediction"]
            assert [x for x in lesions if x["volume_id"] == vid] == les
            if vid in labels:
                np.testing.assert_array_equal(labels[vid], st.open_label(store, vid, f"prediction-{name}")[...])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_resample_nearest_gives_scipys_voxels(device):
    """The map back onto the original grid runs in torch (on the inference device): the voxels
    of scipy's nearest-neighbour affine_transform, on rotations, scalings, flips and shifts that
    put sample points on voxel borders and array edges (within 1e-12), a plane at a time or all."""
    import torch
    from scipy.ndimage import affine_transform

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    from voxelflow.labels import resample_nearest

    rng = np.random.default_rng(0)
    for t in range(120):
        shape = tuple(int(v) for v in rng.integers(2, 9, 3))
        out_shape = tuple(int(v) for v in rng.integers(2, 9, 3))
        labels = rng.integers(0, 5, shape).astype(np.uint8)
        kind = t % 4
        if kind == 0:
            a, b = rng.normal(size=(3, 3)) * 0.4 + np.eye(3), rng.uniform(-3, 3, 3)
        elif kind == 1:
            a, b = np.diag(rng.choice([0.5, 1.0, 2.0, 1 / 3], 3)), np.round(rng.uniform(-3, 3, 3) * 4) / 4
        elif kind == 2:
            a, b = np.eye(3), rng.choice([-1e-12, 1e-12, 0.0, 0.5, -0.5], 3)
        else:
            a = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)
            b = np.array(shape, float) - 1 + rng.choice([-1e-12, 0.0, 1e-12], 3)
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = a, b
        want = affine_transform(labels, a, offset=b, output_shape=out_shape, order=0, mode="constant", cval=0)
        for planes in (None, 1):
            got = resample_nearest(torch.from_numpy(labels).to(device), m, out_shape, planes=planes).cpu().numpy()
            np.testing.assert_array_equal(got, want, err_msg=f"case {t}")
