"""The Prefect UI, checked the way a user looks at it: a real `prefect server start` (with its
UI), the pipeline run against it on Dask, and headless Chromium (Playwright driving the system
browser) finding the flow runs, their task runs and the artifacts — summary tables, progress,
metric curves, QC images. Screenshots go to a temporary folder, or to docs/img/ui/ with
VOXELFLOW_SCREENSHOTS=1 (the README shows those)."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_TRAIN

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A local Prefect server with its UI (voxelflow's own start-up path), the pipeline run
    against it, and the ids a user would click through."""
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (scripts/setup.sh installs it where it can)")
    from flows import runtime

    root = tmp_path_factory.mktemp("ui")
    saved = {k: os.environ.get(k) for k in ("VOXELFLOW_HOME", "PREFECT_API_URL")}
    os.environ["VOXELFLOW_HOME"] = str(root / "home")
    # always a server of our own, with its UI (the test harness's server serves only the API)
    api = runtime.start_local_server()
    os.environ["PREFECT_API_URL"] = api.api_url  # Dask workers spawned from here report to it
    try:
        yield api, _run_pipeline(root, api.api_url)
    finally:
        runtime.stop_local_server()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_pipeline(root: Path, api_url: str) -> dict:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.infer import run_infer
    from flows.ingest import run_ingest
    from flows.preprocess import run_preprocess
    from flows.train import run_train
    from models.run import TrainRun
    from models.train import TrainConfig
    from models.infer import InferConfig
    from voxelflow.ingest import IngestConfig, store_key
    from voxelflow.labels import import_classes, import_segmentations, make_split
    from voxelflow.preprocess import PreprocessConfig
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    archive = build_synthetic_archive(root / "archive", SynthConfig(patients=6, mr_patients=0, shape=(16, 48, 48),
                                                                    positive_fraction=0.5))
    (archive / "images" / "README.txt").write_text("not an image")  # a reason in the reasons table
    key_file = root / "ui.key"
    key_file.write_bytes(base64.b64encode(bytes(range(32))))
    store = str(root / "store")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        run_ingest(IngestConfig(sources=[str(archive / "images")], store=store, secret_file=str(key_file)),
                   n_workers=2)
        key = store_key(store, str(key_file))
        import_segmentations(store, archive / "labels" / "segmentations.csv", key)
        import_classes(store, archive / "labels" / "labels.csv", key)
        make_split(store, fractions=(0.5, 0.25, 0.25))
        pre = run_preprocess(PreprocessConfig(store=store, spacing=(3.0, 3.0, 4.0), labelled_only=True), n_workers=2)
        for task, extra in (("segmentation", {}), ("classification", {"positive_class": "lesion", "positive_label": 2})):
            run_train(TrainRun(store=store, version=pre["version"], name=f"ui-{task}",
                               train=TrainConfig(task=task, **TINY, **extra)), n_workers=1)
        run_infer(InferConfig(store=store, name="ui-classification", explain="all"), n_workers=1)
    return {"store": store}


def _shots() -> Path:
    if os.environ.get("VOXELFLOW_SCREENSHOTS"):
        out = Path(__file__).resolve().parents[1] / "docs" / "img" / "ui"
    else:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="voxelflow-ui-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _flow_run(api_url: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
    assert runs, f"no {name} flow run recorded"
    return runs[0]


def _open_artifact(page, api_url: str, ui_url: str, key: str) -> None:
    """Open an artifact as a user does: its key's page, then the link to its latest version."""
    from playwright.sync_api import expect
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC)
    assert arts, f"no artifact {key}"
    page.goto(f"{ui_url}/artifacts/key/{key}")
    link = page.get_by_role("link", name=str(arts[0].id)[:8])
    expect(link).to_be_visible()
    link.click()
    page.wait_for_url(f"**/artifacts/artifact/{arts[0].id}")


def test_runs_tasks_and_artifacts_show_in_the_ui(ui):
    api, _ = ui
    shots = _shots()
    check_ui(api.api_url, api.ui_url, shots)
    assert len(list(shots.glob("*.png"))) >= 7


def _shot(page, path: Path) -> None:
    page.wait_for_timeout(800)  # let the page's fade-in finish
    page.screenshot(path=str(path))


def check_ui(api_url: str, ui_url: str, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    ingest = _flow_run(api_url, "ingest")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.set_default_timeout(60_000)
        # 1. the runs list: every stage's flow run
        page.goto(f"{ui_url}/runs")
        for flow_name in ("ingest", "preprocess", "train", "infer"):
            expect(page.get_by_text(flow_name, exact=True).first).to_be_visible()
        _shot(page, shots / "runs.png")
        # 2. the ingest run: its task runs (header scans, series conversions) ...
        page.goto(f"{ui_url}/runs/flow-run/{ingest.id}")
        expect(page.get_by_text(ingest.name).first).to_be_visible()
        page.get_by_text("Task Runs", exact=True).click()
        expect(page.get_by_text("scan-headers", exact=False).first).to_be_visible()
        expect(page.get_by_text("convert-series", exact=False).first).to_be_visible()
        _shot(page, shots / "ingest-task-runs.png")
        # ... and its artifacts: the summary, the reasons table, progress
        page.get_by_text("Artifacts", exact=True).last.click()
        expect(page.get_by_text("ingest-not-converted").first).to_be_visible()
        expect(page.get_by_text("ingest-catalog").first).to_be_visible()
        _shot(page, shots / "ingest-artifacts.png")
        # 3. the reasons table, as a user opens it: the key's timeline, then its latest version
        _open_artifact(page, api_url, ui_url, "ingest-not-converted")
        expect(page.get_by_text("not a DICOM or NIfTI file").first).to_be_visible()
        _shot(page, shots / "ingest-reasons.png")
        # 4. training: metrics per epoch and the curve image
        _open_artifact(page, api_url, ui_url, "train-ui-segmentation-epochs")
        expect(page.get_by_text("train_loss").first).to_be_visible()
        _shot(page, shots / "train-epochs.png")
        _open_artifact(page, api_url, ui_url, "train-ui-segmentation-curve")
        curve = page.locator("img[src^='data:image/png']").first
        expect(curve).to_be_visible()
        assert curve.evaluate("img => img.naturalWidth") > 100  # the PNG decoded, not a broken image
        _shot(page, shots / "train-curve.png")
        # 5. inference: Grad-CAM QC images of the classifier
        _open_artifact(page, api_url, ui_url, "explain-ui-classification")
        qc = page.locator("img[src^='data:image/png']").first
        expect(qc).to_be_visible()
        assert qc.evaluate("img => img.naturalWidth") > 50
        _shot(page, shots / "infer-qc.png")
        browser.close()
