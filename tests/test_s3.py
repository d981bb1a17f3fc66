"""Object storage, end to end against a real S3-compatible server (moto's server mode on
loopback): sources on s3://, the store on s3://, and the nightly pipeline (ingest, labels,
preprocess, train, infer) reading and writing it through fsspec, on Dask worker processes."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY_TRAIN
from voxelflow import catalog, registry

BUCKET = "voxelflow-test"
TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, the AWS variables pointing at it (inherited by
    Dask worker processes started later) and an empty bucket. Yields an s3fs filesystem."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mp = pytest.MonkeyPatch()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_pipeline_on_object_storage(s3, prefect_server, tmp_path):
    from flows.nightly import run_nightly
    from voxelflow.export import export_nifti
    from voxelflow.ingest import run_local
    from flows.nightly_config import ModelSpec, NightlyConfig
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    archive = build_synthetic_archive(tmp_path / "archive", SynthConfig(patients=6, mr_patients=0, shape=(16, 48, 48)))
    s3.put(str(archive / "images") + "/", f"{BUCKET}/archive/images/", recursive=True)
    n_files = len([p for p in (archive / "images").rglob("*") if p.is_file()])
    assert len(s3.find(f"{BUCKET}/archive/images")) == n_files
    key = tmp_path / "s3.key"
    key.write_bytes(base64.b64encode(bytes(range(32))))
    store = f"s3://{BUCKET}/store"
    config = NightlyConfig(
        sources=[f"s3://{BUCKET}/archive/images"], store=store, secret_file=str(key),
        segmentations=str(archive / "labels" / "segmentations.csv"), classes=str(archive / "labels" / "labels.csv"),
        split=(0.5, 0.25, 0.25), preprocess={"spacing": [3.0, 3.0, 4.0]},
        models=[ModelSpec(name="seg", task="segmentation", settings=TINY)])
    summary = run_nightly(config, n_workers=2)
    assert [s["stage"] for s in summary["stages"]] == [
        "ingest", "labels", "preprocess", "train seg", "infer seg", "qc"]

    # every input file is accounted for, under its s3:// source
    files = catalog.read_table(store, "files").to_pylist()
    assert len(files) == n_files and {f["source"] for f in files} == {f"s3://{BUCKET}/archive/images"}
    assert {f["status"] for f in files} <= {"converted", "skipped"}
    # the volumes on S3 hold the same voxels as a local ingest of the same files with the same key
    local = tmp_path / "local-store"
    run_local(_local_ingest_config(archive, local, key))
    ours = {r["volume_id"]: r["digest"] for r in catalog.read_table(store, "volumes").to_pylist()}
    theirs = {r["volume_id"]: r["digest"] for r in catalog.read_table(local, "volumes").to_pylist()}
    assert ours == theirs and len(ours) == 6
    assert s3.exists(f"{BUCKET}/store/volumes/{next(iter(ours))}/s0/zarr.json")
    # the model is in the store's registry on S3, and its predictions were written back there
    current = registry.current(store, "seg")
    assert current and s3.exists(f"{BUCKET}/store/models/seg/{current['version']}/weights.pt")
    predicted = [r for r in catalog.read_table(store, "predictions").to_pylist() if r["model"] == "seg"]
    assert predicted and all(s3.exists(f"{BUCKET}/store/volumes/{r['volume_id']}/labels/{r['label_name']}/zarr.json")
                             for r in predicted)
    # and the store reads back from S3 into NIfTI
    paths = export_nifti(store, tmp_path / "nifti", [predicted[0]["volume_id"]])
    assert len(paths) == 1 and paths[0].stat().st_size > 0
    # SQL over the catalog on S3: lesions per predicted volume, as the catalog holds them
    from voxelflow.query import query

    got = query(store, "SELECT p.volume_id, count(l.component) AS lesions, sum(l.voxels) AS voxels FROM predictions p "
                       "LEFT JOIN lesions l USING (volume_id, model, version) WHERE p.model = 'seg' "
                       "GROUP BY ALL ORDER BY 1").to_pylist()
    lesions = [r for r in catalog.read_table(store, "lesions").to_pylist() if r["model"] == "seg"]
    assert got == [{"volume_id": v, "lesions": sum(r["volume_id"] == v for r in lesions),
                    "voxels": sum(r["voxels"] for r in lesions if r["volume_id"] == v) or None}
                   for v in sorted(r["volume_id"] for r in predicted)]
    # nothing was staged or left half-written
    assert not s3.exists(f"{BUCKET}/store/.staging")


def _local_ingest_config(archive, store, key):
    from voxelflow.ingest import IngestConfig

    return IngestConfig(sources=[str(archive / "images")], store=str(store), secret_file=str(key))
