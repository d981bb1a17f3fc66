"""Deployment files, validated statically (there is no container engine here): the compose file
against the Compose specification's schema, the Dockerfiles with hadolint, and what they must say
for voxelflow (a GPU Dask worker with the GPU resource, every service pointed at the same
Prefect API and Dask scheduler, COPY sources that exist)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deployment" / "docker"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (it is a test extra: pip install -e '.[test]')")
    return path


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_follows_the_compose_spec(tmp_path):
    proc = _check_compose(DOCKER / "compose.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    broken["services"]["dask-worker"]["comand"] = ["dask", "worker"]  # a typo the validator must catch
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert _check_compose(tmp_path / "compose.yaml").returncode != 0


def test_compose_services_wire_voxelflow_together():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "prefect-worker", "dask-scheduler", "dask-worker",
            "dask-gpu-worker"} <= set(services)
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    gpu = services["dask-gpu-worker"]
    assert "--resources" in gpu["command"] and "GPU=1" in gpu["command"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.cuda")
    for name in ("prefect-worker", "dask-worker", "dask-gpu-worker"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["VOXELFLOW_DASK_ADDRESS"] == "tcp://dask-scheduler:8786"
        assert env["MALLOC_MMAP_THRESHOLD_"] == "4194304"  # see deployment/README.md
        assert "data:/data" in services[name]["volumes"]
    assert "voxelflow-cpu" in services["prefect-worker"]["command"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint_and_copy_what_exists(dockerfile):
    proc = subprocess.run([_tool("hadolint"), "--config", str(DOCKER / "hadolint.yaml"), str(DOCKER / dockerfile)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (DOCKER / dockerfile).read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        for src in line.split()[:-1]:
            assert (REPO / src).exists(), f"{dockerfile} copies {src}, which the build context lacks"
    assert '"torch==2.13.0"' in text and "MALLOC_MMAP_THRESHOLD_=4194304" in text
    assert re.search(r"^USER \d+$", text, flags=re.M)  # not root


K8S = REPO / "deployment" / "kubernetes"


def _k8s_documents() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_kubernetes_manifests_match_the_kubernetes_schemas():
    """Core resources against the Kubernetes API schemas (kubernetes-validate, strict: unknown
    fields rejected); the dask-kubernetes custom resources' pod and service specs the same way,
    wrapped as the Pods and Service the operator makes of them."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    checked = 0
    for doc in _k8s_documents():
        if doc["apiVersion"].startswith("kubernetes.dask.org/"):
            spec = doc["spec"]
            pods = [spec["worker"]["spec"]] + ([spec["scheduler"]["spec"]] if "scheduler" in spec else [])
            for pod in pods:
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                              "spec": pod}, version, strict=True)
                checked += 1
            if "scheduler" in spec:
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                                              "spec": spec["scheduler"]["service"]}, version, strict=True)
        else:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    assert checked >= 6
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "one", "selector": {}, "template": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does catch errors
        kubernetes_validate.validate(bad, version, strict=True)


def test_kubernetes_dask_cluster_has_a_gpu_worker_group_on_shared_storage():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_documents()}
    cluster = docs[("DaskCluster", "voxelflow")]
    group = docs[("DaskWorkerGroup", "voxelflow-gpu")]
    assert group["spec"]["cluster"] == "voxelflow"
    gpu = group["spec"]["worker"]["spec"]["containers"][0]
    assert "GPU=1" in gpu["args"] and gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    claim = docs[("PersistentVolumeClaim", "voxelflow-data")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in (cluster["spec"]["worker"]["spec"], group["spec"]["worker"]["spec"],
                docs[("Deployment", "voxelflow-prefect-worker")]["spec"]["template"]["spec"]):
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "voxelflow-data"
    worker_env = {e["name"]: e["value"] for e in
                  docs[("Deployment", "voxelflow-prefect-worker")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    # the operator names the scheduler's service <cluster>-scheduler
    assert worker_env["VOXELFLOW_DASK_ADDRESS"] == "tcp://voxelflow-scheduler.voxelflow.svc:8786"
