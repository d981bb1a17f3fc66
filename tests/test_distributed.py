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
