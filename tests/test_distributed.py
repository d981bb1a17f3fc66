"""Data-parallel training: ranks in Dask worker processes joined with gloo, each training on
its own share of the patches; the same weights on every rank; a resumed run equals the
uninterrupted one; a lost rank fails the run, naming its worker, with nothing registered."""

from __future__ import annotations

import math

import pytest
import torch

from models.distributed import Ranks
from models.train import TrainConfig, fit
from voxelflow.data import patch_dataset

SMALL = dict(task="segmentation", patch_size=(16, 32, 32), epochs=3, steps_per_epoch=3, val_steps=2, batch_size=2,
             channels=(8, 16, 32))


def _rank(store: str, version: str, out: str, rank: int, init: str, stop_after: int | None = None) -> dict:
    """One rank's ``fit`` in a Dask worker process (what tasks/train.py runs, without the
    registry): its history, final-weights digest and the weights of its checkpoint."""
    from models import distributed

    torch.set_num_threads(1)
    config = TrainConfig(**SMALL)
    cpu = torch.device("cpu")
    train = patch_dataset(store, config.sampling.patch_size, version=version, split="train", samples_per_epoch=6,
                          seed=0, foreground_oversample=0.9)
    val = patch_dataset(store, config.sampling.patch_size, version=version, split=None, samples_per_epoch=4,
                        seed=99, foreground_oversample=0.9)
    ranks = Ranks(rank, 2, init, timeout_s=60)
    with distributed.joined(ranks, cpu):
        result = fit(config, train, val, out, num_classes=3, device=cpu, stop_after=stop_after, ranks=ranks)
    return {"history": result["history"], "digest": result["weights_digest"], "stopped": result["stopped"]}


def _two_ranks(client, *args, **kwargs) -> list[dict]:
    from models.distributed import free_port

    workers = sorted(client.scheduler_info()["workers"])
    init = f"tcp://127.0.0.1:{client.run(free_port, workers=[workers[0]])[workers[0]]}"
    futures = [client.submit(_rank, *args, rank, init, pure=False, workers=[w], allow_other_workers=False, **kwargs)
               for rank, w in enumerate(workers)]
    return client.gather(futures)


@pytest.fixture(scope="module")
def two_workers():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@pytest.mark.slow
def test_two_gloo_ranks_train_one_model_and_resume_to_the_same_weights(two_workers, preprocessed_store, tmp_path):
    store, version = preprocessed_store
    whole = _two_ranks(two_workers, store, version, str(tmp_path / "whole"))
    # one model: both ranks hold the same weights after every step (fit checks it, and says so)
    assert whole[0]["digest"] == whole[1]["digest"]
    history = whole[0]["history"]
    assert [h["world_size"] for h in history] == [2, 2, 2] and all(len(h["rank_samples_per_s"]) == 2 for h in history)
    assert all(math.isfinite(h["train_loss"]) for h in history)
    assert min(h["train_loss"] for h in history[1:]) < history[0]["train_loss"]
    # the ranks drew other patches (each its share), yet report one history
    assert whole[0]["history"] == whole[1]["history"]

    first = _two_ranks(two_workers, store, version, str(tmp_path / "resumed"), stop_after=1)
    assert {r["stopped"] for r in first} == {"interrupted"}
    again = _two_ranks(two_workers, store, version, str(tmp_path / "resumed"))
    assert again[0]["digest"] == again[1]["digest"] == whole[0]["digest"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["task"]["models"]["model"][k], v) for k, v in b["task"]["models"]["model"].items())
    assert [h["train_loss"] for h in a["state"]["history"]] == [h["train_loss"] for h in b["state"]["history"]]
    assert len(b["rank_rng"]) == 2  # every rank's random state, so each continues where it was


def test_rank_shards_draw_disjoint_samples_of_one_epoch(preprocessed_store):
    """Rank r of w draws sample i*w + r of the whole epoch: together the ranks draw exactly the
    samples one process would draw over a w times longer epoch."""
    store, version = preprocessed_store
    whole = patch_dataset(store, (16, 32, 32), version=version, split="train", samples_per_epoch=12, seed=3)
    shards = [whole.shard(r, 3) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    whole.set_epoch(2)
    drawn = {i * 3 + r: shards[r].sample(i) for r in range(3) for i in range(4)}
    assert drawn == {j: whole.sample(j) for j in range(12)}
    assert whole.sample(0) != shards[1].sample(0)
    with pytest.raises(ValueError, match="rank 3 is not one of 3"):
        whole.shard(3, 3)


def _run(store: str, version: str, name: str, **kw):
    from models.run import TrainRun

    train = TrainConfig(**{**SMALL, "epochs": 2, "val_steps": 1} | kw.pop("train", {}))
    return TrainRun(store=store, version=version, name=name, train=train, augment=False, world_size=2, **kw)


@pytest.mark.slow
def test_the_train_flow_runs_two_ranks_on_two_workers_and_records_them(preprocessed_store, prefect_server):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train import run_train
    from voxelflow import registry

    store, version = preprocessed_store
    summary = run_train(_run(store, version, "seg-ddp"), n_workers=2)
    assert summary["throughput"]["world_size"] == 2 and len(summary["throughput"]["rank_samples_per_s"]) == 2
    assert [r["rank"] for r in summary["ranks"]] == [0, 1] and len({r["worker"] for r in summary["ranks"]}) == 2
    info = json.loads((registry.version_dir(store, "seg-ddp", summary["version"]) / "model.json").read_text())
    assert info["config"]["world_size"] == 2 and info["metrics"]["throughput"]["world_size"] == 2
    assert all(h["world_size"] == 2 for h in info["metrics"]["history"])
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-seg-ddp-ranks"])))
    assert found and "2 ranks" in found[0].description


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_naming_its_worker_with_nothing_registered(preprocessed_store, prefect_server,
                                                                                tmp_path):
    """`dask worker --nworkers 2` as a user starts it; SIGKILL one rank's worker process once
    both train: the run fails within the timeout with an error naming that worker, and the
    registry holds no model (the checkpoint stays, to resume from)."""
    import os
    import signal
    import threading
    import time

    from distributed import Client

    from flows.train import rank_workers, run_train
    from models.distributed import RankLostError
    from tests.conftest import dask_cli_cluster
    from voxelflow import registry

    store, version = preprocessed_store
    run = _run(store, version, "seg-ddp-killed", rank_timeout_s=30.0,
               train={"epochs": 500, "early_stopping": 1000, "steps_per_epoch": 1})
    folder = registry.version_dir(store, "seg-ddp-killed",
                                  registry.version_id(run.identity(), registry.data_snapshot(store, version)))
    with dask_cli_cluster(tmp_path, prefect_server, ["--nworkers", "2"]) as (sched_file, _):
        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            pids = client.run(os.getpid)
            victim = rank_workers(client, 2, gpu=False)[1][0]
            outcome: dict = {}

            def train() -> None:
                try:
                    outcome["summary"] = run_train(run, dask_address=client.scheduler.address)
                except Exception as exc:  # noqa: BLE001 - the test inspects it
                    outcome["error"] = exc

            thread = threading.Thread(target=train, daemon=True)
            thread.start()
            deadline = time.monotonic() + 180
            while not (folder / "checkpoint.pt").exists():  # both ranks have trained an epoch
                assert time.monotonic() < deadline and thread.is_alive(), outcome
                time.sleep(0.5)
            os.kill(pids[victim], signal.SIGKILL)
            killed = time.monotonic()
            thread.join(timeout=120)
    assert not thread.is_alive(), "the run hung after a rank was killed"
    assert time.monotonic() - killed < run.rank_timeout_s + 60
    error = outcome.get("error")
    assert isinstance(error, RankLostError), outcome
    assert victim in str(error) and "rank 1" in str(error)
    assert not (folder / "model.json").exists() and registry.current(store, "seg-ddp-killed") is None
