"""Shared fixtures: real test data shipped by PyPI packages, dcm2niix, a Prefect test server."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest

PYDICOM_DATA = Path(pydicom.data.get_testdata_file("MR_small.dcm")).parent
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


@pytest.fixture(autouse=True, scope="session")
def _voxelflow_home(tmp_path_factory):
    """Keys and local servers of the tests live in a temporary home, never the user's."""
    home = tmp_path_factory.mktemp("voxelflow-home")
    old = os.environ.get("VOXELFLOW_HOME")
    os.environ["VOXELFLOW_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("VOXELFLOW_HOME", None)
    else:
        os.environ["VOXELFLOW_HOME"] = old


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (the test harness), exported to the environment so that Dask
    worker processes report to it instead of starting temporary servers of their own."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if old is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old


def dcm2niix(folder: Path, outdir: Path) -> list[Path]:
    """Convert a folder with the reference converter; returns the NIfTI files it wrote."""
    import dcm2niix as d2n

    outdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([d2n.bin, "-z", "n", "-b", "n", "-f", "%s_%j_%p", "-o", str(outdir), str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(outdir.glob("*.nii"))


def canonical(path_or_img) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (scaled) and affine after reorienting to the closest canonical orientation."""
    img = nib.load(path_or_img) if isinstance(path_or_img, (str, Path)) else path_or_img
    img = nib.as_closest_canonical(img)
    return np.asarray(img.get_fdata(dtype=np.float64)), img.affine


def ingest_config(sources, store, **kw):
    from voxelflow.ingest import IngestConfig

    return IngestConfig(sources=[str(s) for s in sources], store=str(store), **kw)


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory):
    """A small synthetic archive ingested, with segmentations, classes and a split."""
    from voxelflow.ingest import run_local, store_key
    from voxelflow.labels import import_classes, import_segmentations, make_split
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    import base64

    root = tmp_path_factory.mktemp("labelled-store")
    archive = build_synthetic_archive(root / "archive", SynthConfig(patients=6, mr_patients=1, shape=(16, 48, 48)))
    store = root / "store"
    # A fixed key: pseudonyms, volume ids, the split and so every sampled patch are the same
    # in every test session.
    key_file = root / "test.key"
    key_file.write_bytes(base64.b64encode(bytes(range(32))))
    run_local(ingest_config([archive / "images"], store, secret_file=str(key_file)))
    key = store_key(str(store), str(key_file))
    import_segmentations(store, archive / "labels" / "segmentations.csv", key)
    import_classes(store, archive / "labels" / "labels.csv", key)
    make_split(store, seed=0)
    return store


def run_cli(*args, env: dict | None = None, inherit: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``voxelflow ARGS`` in a subprocess, as a user runs it (``python -m flows.cli``); ``env``
    is added to this process's environment, or replaces it with ``inherit=False``."""
    import sys

    environment = {**os.environ, **(env or {})} if inherit else dict(env or {})
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=environment)


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """A small CT study: 2 series of 12 slices of 48x48 and a text file (25 files)."""
    from voxelflow.phantom import SeriesSpec, ct_phantom, write_ct_series

    root = tmp_path_factory.mktemp("study")
    for i in range(2):
        write_ct_series(ct_phantom((12, 48, 48), seed=i), root / f"series{i}", SeriesSpec(series_number=i + 1))
    (root / "notes.txt").write_text("not an image")
    return root


def task_pids(log_text: str) -> set[int]:
    """The processes an ingest's tasks ran in, from the lines they log."""
    import re

    return {int(p) for p in re.findall(r"on worker pid (\d+)", log_text)}


# A training configuration a few steps long on a small network and small patches, for tests
# that need a trained model, not a good one (JSON-friendly: nightly settings take it as is).
TINY_TRAIN = {"patch_size": [16, 32, 32], "epochs": 2, "steps_per_epoch": 3, "val_steps": 2, "batch_size": 2,
              "channels": [8, 16, 32]}


@pytest.fixture(scope="session")
def preprocessed_store(labelled_store) -> tuple[str, str]:
    """``(store, version)``: the labelled store with a preprocessed copy at 2 x 2 x 3 mm (made
    once a session; later calls find it done)."""
    from voxelflow.preprocess import PreprocessConfig, resolve, run_local

    config = resolve(PreprocessConfig(store=str(labelled_store), spacing=(2.0, 2.0, 3.0)))
    run_local(config)
    return str(labelled_store), config.version()


@contextlib.contextmanager
def dask_cli_cluster(folder: Path, prefect_api: str, *worker_args: list[str]):
    """A Dask scheduler and worker processes started with the `dask` command line, as a user
    starts them, on loopback. One worker command per ``worker_args`` entry (extra flags).
    Yields ``(scheduler_file, [scheduler, worker, ...] processes)``; stops them afterwards."""
    import sys
    import time

    dask_cli = Path(sys.executable).parent / "dask"
    sched_file = folder / "scheduler.json"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    procs = [subprocess.Popen([dask_cli, "scheduler", "--scheduler-file", sched_file, "--port", "0",
                               "--host", "127.0.0.1", "--dashboard-address", ":0"], env=env, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for extra in worker_args:
            procs.append(subprocess.Popen([dask_cli, "worker", "--scheduler-file", sched_file, "--nthreads", "1",
                                           "--host", "127.0.0.1", *extra], env=env, stderr=subprocess.DEVNULL))
        yield sched_file, procs
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
