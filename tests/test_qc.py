"""The QC report (voxelflow.qc): every volume and every file not converted listed, images drawn
as a radiologist reads them (orientation from the affine, physical aspect), label and
prediction outlines, nothing drawn again when nothing changed; and the page itself, driven in
headless Chromium: images load, search filters, pages turn. Screenshots go to a temporary
folder, or to docs/img/ with VOXELFLOW_SCREENSHOTS=1 (the README shows those)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy import ndimage

from tests.conftest import PYDICOM_DATA, ingest_config
from voxelflow import catalog, qc
from voxelflow.geometry import orientation_code
from voxelflow.store import init_store, open_label, open_volume, write_label, write_volume

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu"]
GROUND_TRUTH = qc.LABEL_COLOURS[0]  # label value 1


def _junk(folder: Path) -> Path:
    """Files an archive holds beside its images: each is skipped or fails, with a reason."""
    folder.mkdir(parents=True)
    (folder / "<em>notes.txt").write_text("not an image")  # a name that is also HTML
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    (folder / "fake.nii").write_text("this is not nifti")
    shutil.copy(PYDICOM_DATA / "MR_truncated.dcm", folder / "truncated.dcm")
    return folder


def _predict(store: Path, volume_id: str, model: str, labels: np.ndarray) -> None:
    """What a segmentation model's inference leaves in a store: a label and a prediction row."""
    write_label(store, volume_id, f"prediction-{model}", labels.astype(np.uint8))
    catalog.upsert(store, "predictions", [{
        "volume_id": volume_id, "model": model, "version": "v1", "task": "segmentation",
        "label_name": f"prediction-{model}", "prediction": f"prediction-{model}",
        "created_at": datetime.now(timezone.utc)}], catalog.PREDICTION_SCHEMA, ("volume_id", "model"))


def _truth(store: Path, volume_id: str) -> np.ndarray:
    name = next(r["name"] for r in catalog.read_table(store, "labels").to_pylist() if r["volume_id"] == volume_id)
    return open_label(store, volume_id, name)[...]


@pytest.fixture(scope="module")
def qc_store(labelled_store, tmp_path_factory) -> Path:
    """A copy of the labelled store (tests here change it), with junk ingested beside it and
    a model's prediction (the ground truth grown by two voxels) for its first volume."""
    from voxelflow.ingest import run_local

    root = tmp_path_factory.mktemp("qc")
    store = root / "store"
    shutil.copytree(labelled_store, store, ignore=shutil.ignore_patterns("qc", "preprocessed"))
    # other tests of the session may have predicted into the labelled store: start without
    (store / "catalog" / "predictions.parquet").unlink(missing_ok=True)
    run_local(ingest_config([_junk(root / "junk")], store, secret_file=str(labelled_store.parent / "test.key")))
    first = min(r["volume_id"] for r in catalog.read_table(store, "labels").to_pylist())
    _predict(store, first, "demo", ndimage.binary_dilation(_truth(store, first) > 0, iterations=2))
    return store


def _index(store: Path) -> dict:
    return json.loads((store / "qc" / "index.json").read_text())


def _pngs(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (store / "qc" / "img").glob("*.png")}


def _image(store: Path, entry: dict, view: str) -> np.ndarray:
    return np.asarray(Image.open(store / "qc" / entry["images"][view].split("?")[0]))


def _has(rgb: np.ndarray, colour) -> bool:
    return bool((rgb == np.asarray(colour, np.uint8)).all(-1).any())


# ----------------------------------------------------------------- the report's content


def test_the_report_lists_every_volume_and_every_file_not_converted(qc_store):
    html = qc.write_report(qc_store)
    assert html == qc_store / "qc" / "index.html" and "QC_INDEX" in html.read_text()
    index = _index(qc_store)
    assert (qc_store / "qc" / "index.js").read_text() == f"window.QC_INDEX = {json.dumps(index, separators=(',', ':'))};\n"
    volumes = catalog.read_table(qc_store, "volumes").to_pylist()
    assert [v["volume_id"] for v in index["volumes"]] == sorted(v["volume_id"] for v in volumes)
    by_id = {v["volume_id"]: v for v in index["volumes"]}
    for row in volumes:
        entry = by_id[row["volume_id"]]
        assert (entry["modality"], entry["shape"], entry["orientation"], entry["n_files"]) == \
            (row["modality"], row["shape"], row["orientation"], row["n_files"])
        assert entry["warnings"] == (row["warnings"] or [])
    files = [r for r in catalog.read_table(qc_store, "files").to_pylist() if r["status"] != "converted"]
    junk = {"<em>notes.txt", "empty.dcm", "garbage.dcm", "fake.nii", "truncated.dcm"}
    assert junk <= {r["path"] for r in files}
    listed = {(f["source"], f["path"]): (f["status"], f["reason"]) for f in index["files"]}
    assert listed == {(r["source"], r["path"]): (r["status"], r["reason"]) for r in files}
    assert all(f["reason"] for f in index["files"])
    assert index["counts"]["files"]["failed"] >= 3 and index["counts"]["files"]["skipped"] >= 2
    assert index["counts"]["files"]["converted"] == sum(r["n_files"] for r in volumes)


def test_images_are_pngs_of_the_requested_size_with_outlines_where_labels_cross_the_plane(qc_store):
    qc.write_report(qc_store, size=192, force=True)
    index = _index(qc_store)
    labelled = {r["volume_id"]: r["name"] for r in catalog.read_table(qc_store, "labels").to_pylist()}
    assert labelled
    outlined = 0
    for entry in index["volumes"]:
        assert set(entry["images"]) == {"axial", "coronal", "sagittal"}
        vol = open_volume(qc_store, entry["volume_id"])
        name = labelled.get(entry["volume_id"])
        label = open_label(qc_store, entry["volume_id"], name) if name else None
        for cut in qc.orthogonal_cuts(vol.affine, vol.array.shape[-3:]):
            with Image.open(qc_store / "qc" / entry["images"][cut.view].split("?")[0]) as img:
                img.verify()
            with Image.open(qc_store / "qc" / entry["images"][cut.view].split("?")[0]) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "RGB", (192, 192))
                rgb = np.asarray(img)
            assert rgb.std() > 10  # anatomy, not a blank image
            crosses = label is not None and bool((cut.take(label) == 1).any())
            assert _has(rgb, GROUND_TRUTH) == crosses, (entry["volume_id"], cut.view)
            outlined += crosses
            if entry["predictions"]:  # the model's outline, in its own colour
                assert _has(rgb, qc.MODEL_COLOURS[0]) == bool((cut.take(open_label(
                    qc_store, entry["volume_id"], "prediction-demo")) > 0).any()), (entry["volume_id"], cut.view)
    assert outlined
    assert [e["predictions"][0]["model"] for e in index["volumes"] if e["predictions"]] == ["demo"]
    qc.write_report(qc_store, force=True)  # back to the default size for the tests that follow


def test_a_second_report_draws_nothing_and_a_change_draws_only_what_changed(qc_store):
    qc.write_report(qc_store)
    before = _pngs(qc_store)
    qc.write_report(qc_store)
    run = _index(qc_store)["run"]
    assert (run["rendered"], run["reused"], run["removed"]) == (0, len(_index(qc_store)["volumes"]), 0)
    assert _pngs(qc_store) == before

    # another model's prediction for another volume: that volume alone is drawn again, with
    # the new model's outline in a colour of its own; the first model keeps its colour
    entries = _index(qc_store)["volumes"]
    vid = next(e["volume_id"] for e in entries if e["labels"] and not e["predictions"])
    _predict(qc_store, vid, "another", _truth(qc_store, vid) > 0)  # sorts before "demo"
    qc.write_report(qc_store)
    index = _index(qc_store)
    assert index["run"]["rendered"] == 1
    assert index["legend"]["models"] == {"another": qc._hex(qc.MODEL_COLOURS[1]), "demo": qc._hex(qc.MODEL_COLOURS[0])}
    after = _pngs(qc_store)
    assert {n for n in after if after[n] != before.get(n)} == {f"{vid}-{v}.png" for v in qc.VIEWS}
    entry = next(e for e in index["volumes"] if e["volume_id"] == vid)
    assert [p["model"] for p in entry["predictions"]] == ["another"]
    assert _has(_image(qc_store, entry, "axial"), qc.MODEL_COLOURS[1])

    # a volume gone from the catalog: its images go too
    gone = entries[-1]["volume_id"]
    table = catalog.read_table(qc_store, "volumes")
    catalog.write_table(qc_store, "volumes", table.filter(pa.compute.not_equal(table["volume_id"], gone)))
    try:
        qc.write_report(qc_store)
        assert (_index(qc_store)["run"]["rendered"], _index(qc_store)["run"]["removed"]) == (0, 1)
        assert not list((qc_store / "qc" / "img").glob(f"{gone}-*"))
    finally:
        catalog.write_table(qc_store, "volumes", table)
        qc.write_report(qc_store)
    assert len(_index(qc_store)["volumes"]) == len(entries)


# ----------------------------------------------------------------- how the planes are drawn


def _world_volume(affine: np.ndarray, shape_zyx) -> np.ndarray:
    """HU by where a voxel is in the patient, from the volume's centre: right +120,
    anterior +60, superior +30, on -100 (all inside the soft-tissue window, so never black)."""
    z, y, x = np.indices(shape_zyx)
    xyz = np.stack([x, y, z, np.ones_like(x)], -1).astype(np.float64) @ affine.T
    centre = affine @ np.array([(n - 1) / 2 for n in shape_zyx[::-1]] + [1.0])
    ras = xyz[..., :3] - centre[:3]
    return (-100 + 120 * (ras[..., 0] > 0) + 60 * (ras[..., 1] > 0) + 30 * (ras[..., 2] > 0)).astype(np.int16)


def _affine(columns, spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel axes (x, y, z) pointing along ``columns`` (RAS unit vectors), ``spacing`` mm apart."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(columns, dtype=np.float64).T * np.asarray(spacing)
    a[:3, 3] = origin
    return a


R, L, A, P, S, I = (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)
GEOMETRIES = {  # orientation code -> voxel axis directions, spacing (x, y, z) mm, array shape (z, y, x)
    "LPS": ((L, P, S), (0.8, 0.8, 2.5), (24, 40, 40)),
    "RAS": ((R, A, S), (1.0, 1.0, 1.0), (30, 30, 30)),
    "RPI": ((R, P, I), (0.7, 0.7, 4.0), (12, 36, 44)),
    "PIR": ((P, I, R), (1.0, 1.2, 3.0), (10, 32, 36)),  # sagittal slices stacked left to right
    "LIP": ((L, I, P), (0.9, 0.9, 2.0), (16, 40, 30)),  # coronal slices stacked front to back
}


@pytest.fixture(scope="module")
def geometry_store(tmp_path_factory) -> Path:
    """One volume per orientation in :data:`GEOMETRIES`, plus a 4-D and an RGB volume."""
    store = tmp_path_factory.mktemp("qc-geometry") / "store"
    init_store(store)
    rows = []

    def add(vid, data, affine, **kw):
        info = write_volume(store, vid, data, affine, **kw)
        rows.append({"volume_id": vid, "kind": "nifti", "modality": "CT", "shape": list(data.shape),
                     "spacing": list(info.spacing), "orientation": orientation_code(affine), "dtype": info.dtype,
                     "levels": info.levels, "affine": affine.ravel().tolist(), "n_files": 1, "digest": info.digest,
                     "warnings": []})

    for code, (axes, spacing, shape) in GEOMETRIES.items():
        affine = _affine(axes, spacing)
        assert orientation_code(affine) == code
        add(f"v-{code.lower()}", _world_volume(affine, shape), affine)
    affine = _affine((L, P, S), (1.0, 1.0, 2.0))
    add("v-4d", np.stack([_world_volume(affine, (8, 20, 20))] * 3), affine, time_step=2.0)
    add("v-rgb", np.zeros((3, 4, 8, 8), np.uint8), affine, channels="RGB")
    catalog.write_table(store, "volumes", pa.Table.from_pylist(rows, schema=catalog.VOLUME_SCHEMA))
    qc.write_report(store, size=128)
    return store


def _content(rgb: np.ndarray) -> np.ndarray:
    """The image without its black letterbox (the test volumes have no black voxel)."""
    rows, cols = np.nonzero(rgb.max(-1) > 0)
    return rgb[rows.min():rows.max() + 1, cols.min():cols.max() + 1, 0].astype(np.float64)


@pytest.mark.parametrize("code", list(GEOMETRIES))
def test_planes_are_oriented_as_radiologists_read_them_whatever_the_voxel_order(geometry_store, code):
    """Axial from the feet (patient right on the left, anterior up), coronal from the front
    (right on the left, superior up), sagittal from the left (anterior on the left, superior
    up): the half of each image that should be brighter is."""
    entry = next(e for e in _index(geometry_store)["volumes"] if e["volume_id"] == f"v-{code.lower()}")
    for view, (left_brighter, top_brighter) in {"axial": ("R", "A"), "coronal": ("R", "S"),
                                                "sagittal": ("A", "S")}.items():
        img = _content(_image(geometry_store, entry, view))
        h, w = img.shape
        assert img[:, : w // 2 - 1].mean() > img[:, w // 2 + 1:].mean() + 10, (code, view, left_brighter)
        assert img[: h // 2 - 1].mean() > img[h // 2 + 1:].mean() + 5, (code, view, top_brighter)
        # the letters the page writes at the image's top and left edges say the same
        top, _, left, _ = _index(geometry_store)["views"][view]
        assert (left, top) == (left_brighter, top_brighter)


@pytest.mark.parametrize("code", list(GEOMETRIES))
def test_planes_have_the_physical_aspect_at_one_scale(geometry_store, code):
    axes, spacing, shape = GEOMETRIES[code]
    extent = {}  # millimetres along R-L, A-P, S-I
    for ax, mm, n in zip(axes, spacing, shape[::-1]):
        extent[int(np.argmax(np.abs(ax)))] = mm * n
    px_per_mm = 128 / max(extent.values())
    entry = next(e for e in _index(geometry_store)["volumes"] if e["volume_id"] == f"v-{code.lower()}")
    for view, (rows, cols) in {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}.items():
        h, w = _content(_image(geometry_store, entry, view)).shape
        assert abs(h - extent[rows] * px_per_mm) <= 1.5 and abs(w - extent[cols] * px_per_mm) <= 1.5, (view, h, w)


def test_a_4d_volume_shows_its_first_time_point_and_an_rgb_volume_is_noted(geometry_store):
    by_id = {e["volume_id"]: e for e in _index(geometry_store)["volumes"]}
    assert set(by_id["v-4d"]["images"]) == set(qc.VIEWS)
    assert by_id["v-4d"]["notes"] == ["3 time points: the first is shown"]
    assert by_id["v-rgb"]["images"] == {} and "RGB colour volume" in by_id["v-rgb"]["notes"][0]


def test_ct_is_windowed_for_soft_tissue_and_other_modalities_by_percentiles():
    assert qc.display_window("CT", []) == (-160.0, 240.0)
    low, high = qc.display_window("MR", [np.arange(1001.0)])
    assert (low, high) == pytest.approx((10.0, 990.0))
    assert qc.display_window(None, [np.zeros((4, 4))]) == (0.0, 1.0)


def test_a_volume_missing_from_the_store_is_reported_not_fatal(geometry_store):
    shutil.rmtree(geometry_store / "volumes" / "v-ras")
    try:
        qc.write_report(geometry_store, size=128, force=True)
        entry = next(e for e in _index(geometry_store)["volumes"] if e["volume_id"] == "v-ras")
        assert entry["images"] == {} and entry["notes"][0].startswith("cannot be read: volume v-ras")
        assert not list((geometry_store / "qc" / "img").glob("v-ras-*"))  # its old images are gone
        assert len(list((geometry_store / "qc" / "img").glob("*.png"))) == 3 * len(GEOMETRIES)  # the four others and the 4-D one
    finally:
        affine = _affine(*GEOMETRIES["RAS"][:2])
        write_volume(geometry_store, "v-ras", _world_volume(affine, GEOMETRIES["RAS"][2]), affine)
        qc.write_report(geometry_store, size=128, force=True)


def test_a_folder_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    from voxelflow.errors import SettingError

    with pytest.raises(SettingError, match="has no catalog"):
        qc.write_report(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(ValueError, match="page_size >= 1"):
        qc.write_report(tmp_path, page_size=0)


def test_the_library_module_imports_no_orchestrator_and_no_model():
    import ast

    tree = ast.parse(Path(qc.__file__).read_text())
    tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not tops & {"prefect", "dask", "distributed", "models", "torch", "flows", "tasks"}


# ----------------------------------------------------------------- the page in a browser


def _shots() -> Path:
    if os.environ.get("VOXELFLOW_SCREENSHOTS"):
        out = Path(__file__).resolve().parents[1] / "docs" / "img"
    else:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="voxelflow-qc-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _big_report(store: Path, n: int) -> Path:
    """The report of ``store`` with its volumes repeated to ``n`` (ids ``v-00000``, ...), beside it."""
    index = _index(store)
    index["volumes"] = [dict(index["volumes"][k % len(index["volumes"])], volume_id=f"v-{k:05d}") for k in range(n)]
    index["page_size"] = 50
    big = store / "qc-big"
    big.mkdir(exist_ok=True)
    (big / "index.js").write_text(f"window.QC_INDEX = {json.dumps(index)};\n")
    shutil.copy(store / "qc" / "index.html", big / "index.html")
    if not (big / "img").exists():
        (big / "img").symlink_to(store / "qc" / "img")
    return big / "index.html"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_the_page_loads_its_images_searches_and_pages_in_chromium(qc_store):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no system Chromium at {CHROMIUM} (the Debian package 'chromium' provides it)")
    from playwright.sync_api import expect, sync_playwright

    qc.write_report(qc_store, page_size=3)
    index = _index(qc_store)
    n = len(index["volumes"])
    pages = -(-n // 3)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(qc_store / "qc")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shots = _shots()
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
            cards = page.locator(".card")
            expect(cards).to_have_count(3)
            expect(page.locator("#volumes-pager .page")).to_have_text(f"page 1 of {pages}")
            # every image of the page decodes (lazy ones once scrolled into view)
            for k in range(3):
                cards.nth(k).scroll_into_view_if_needed()
            page.wait_for_function("[...document.querySelectorAll('img.view')].every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("img.view").count() == 9
            assert page.evaluate("[...document.querySelectorAll('img.view')].map(i => i.naturalWidth)") == [256] * 9
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(300)
            page.screenshot(path=str(shots / "qc-report.png"))
            first = cards.evaluate_all("cs => cs.map(c => c.dataset.volume)")
            assert first == [v["volume_id"] for v in index["volumes"][:3]]

            # paging
            page.locator("#volumes-pager .next").click()
            expect(page.locator("#volumes-pager .page")).to_have_text(f"page 2 of {pages}")
            assert cards.evaluate_all("cs => cs.map(c => c.dataset.volume)") == \
                [v["volume_id"] for v in index["volumes"][3:6]]
            page.locator("#volumes-pager .last").click()
            expect(cards).to_have_count(n - 3 * (pages - 1))
            expect(page.locator("#volumes-pager .next")).to_be_disabled()

            # search: by volume id, then by a file's reason
            target = index["volumes"][4]["volume_id"]
            page.locator("#search").fill(target[:8])
            expect(cards).to_have_count(1)
            expect(cards.first).to_have_attribute("data-volume", target)
            expect(page.locator("#volumes-pager .page")).to_have_text("page 1 of 1")
            page.locator("#search").fill("EMPTY file")
            expect(cards).to_have_count(0)
            expect(page.locator("#files tr.file")).to_have_count(1)
            expect(page.locator("#files tr.file td.path").first).to_have_text("empty.dcm")
            page.locator("#search").fill("dicom")
            expect(page.locator("#volumes-count")).to_contain_text("match")
            dicom_volumes = sum(v["kind"] == "dicom" for v in index["volumes"])
            expect(page.locator("#volumes-count")).to_have_text(f"{dicom_volumes} of {n} match")
            matching = [f for f in index["files"] if "dicom" in f"{f['source']} {f['path']} {f['status']} {f['reason']}".lower()]
            expect(page.locator("#files tr.file")).to_have_count(min(3, len(matching)))
            page.wait_for_timeout(300)
            page.screenshot(path=str(shots / "qc-search.png"), full_page=True)

            # a file name is shown as text, never parsed as HTML
            page.locator("#search").fill("notes.txt")
            expect(page.locator("#files td.path").first).to_have_text("<em>notes.txt")
            assert page.locator("#files em").count() == 0

            # the same page from disk (file://): the index is a script, not a fetch
            page.goto((qc_store / "qc" / "index.html").as_uri())
            expect(cards).to_have_count(3)

            # 10^4 volumes: one page of cards in the DOM, and a search over all of them
            big = _big_report(qc_store, 10_000)
            page.goto(big.as_uri())
            expect(cards).to_have_count(50)
            expect(page.locator("#volumes-pager .page")).to_have_text("page 1 of 200")
            assert page.locator("img").count() == 150
            page.locator("#search").fill("v-09876")
            expect(cards).to_have_count(1)
            expect(cards.first).to_have_attribute("data-volume", "v-09876")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert not errors, errors


@pytest.mark.slow
def test_the_flow_step_draws_in_batches_on_dask_workers(labelled_store, tmp_path, prefect_server, monkeypatch):
    """The qc flow (the nightly's last stage; ingest and infer end with the same step) spreads
    the drawing over the cluster in batches and writes the same report as the library."""
    import tasks.qc
    from flows.qc import run_qc

    store = tmp_path / "store"
    shutil.copytree(labelled_store, store, ignore=shutil.ignore_patterns("qc"))
    monkeypatch.setattr(tasks.qc, "VOLUMES_PER_TASK", 2)  # planned in the flow, in this process
    html = run_qc(str(store), n_workers=2)
    index = _index(store)
    volumes = catalog.read_table(store, "volumes").to_pylist()
    assert html.endswith("index.html") and index["run"]["rendered"] == len(volumes) == len(index["volumes"])
    assert all(len(v["images"]) == 3 for v in index["volumes"])
    assert len(_pngs(store)) == 3 * len(volumes)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["qc"])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks_of_run = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
    draws = [t for t in tasks_of_run if t.name.startswith("qc-draw")]
    assert len(draws) == -(-len(volumes) // 2)  # batches of 2 volumes, each a task on the cluster
