"""One key per store: two first runs into one new store from different VOXELFLOW_HOMEs agree on
one store id and one de-identification key; the loser stops with a clear error and keeps no
key for that store; a later run with another key is refused before it writes a pseudonym."""

from __future__ import annotations

import base64
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from tests.conftest import PYDICOM_DATA, run_cli
from voxelflow.deid import KEY_CLAIM, key_check, key_path, load_key
from voxelflow.errors import ConfigurationError
from voxelflow.ingest import prepare_store, store_key
from voxelflow.store import store_id


def _first_run(store: str, home: str, start, results) -> None:
    """One 'first run' in its own process and home, released at the same moment as the other."""
    os.environ["VOXELFLOW_HOME"] = home
    start.wait()
    try:
        sid = prepare_store(store)
        results.put((home, "ok", sid))
    except ConfigurationError as exc:
        results.put((home, "refused", str(exc)))
    except Exception as exc:  # anything else is a failure of the test, reported, not a hang
        results.put((home, "error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("attempt", range(6))
def test_two_first_runs_at_once_share_one_store_and_one_key(tmp_path, attempt):
    ctx = mp.get_context("fork")
    store = str(tmp_path / "store")
    homes = [str(tmp_path / f"home-{i}") for i in range(2)]
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_first_run, args=(store, h, start, results)) for h in homes]
    for p in procs:
        p.start()
    outcome = {h: (status, detail) for h, status, detail in (results.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    sid = store_id(store)
    won = [h for h, (status, _) in outcome.items() if status == "ok"]
    lost = [h for h, (status, _) in outcome.items() if status == "refused"]
    assert len(won) == 1 and len(lost) == 1, outcome
    assert outcome[won[0]][1] == sid  # both saw one store id
    assert "is taken" in outcome[lost[0]][1] and "--secret-file" in outcome[lost[0]][1]
    # the winner's key is the store's; the loser kept no key for it
    winner_key = load_key(sid, home=Path(won[0]))
    assert (Path(store) / KEY_CLAIM).read_text().count(key_check(winner_key)) == 1
    assert not key_path(sid, Path(lost[0])).exists()


def test_a_later_run_with_another_key_is_refused_and_the_right_key_accepted(tmp_path):
    store = str(tmp_path / "store")
    sid = prepare_store(store)
    own = key_path(sid)
    other = tmp_path / "other.key"
    other.write_bytes(base64.b64encode(bytes(range(32))))
    with pytest.raises(ConfigurationError, match="is taken"):
        prepare_store(store, str(other))
    with pytest.raises(ConfigurationError, match="is taken"):
        store_key(store, str(other))  # labels with another key would match no volume
    assert prepare_store(store, str(own)) == sid and store_key(store, str(own)) == load_key(sid)


def test_voxelflow_ingest_from_another_home_stops_with_one_line(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home-a"))
    prepare_store(str(store))  # the first run's start (the rest of an ingest changes nothing here)
    second = run_cli("ingest", PYDICOM_DATA / "CT_small.dcm", "--store", store,
                     env={"VOXELFLOW_HOME": str(tmp_path / "home-b")})
    assert second.returncode == 2 and "is taken" in second.stderr and "Traceback" not in second.stderr
    assert not list((tmp_path / "home-b").glob("keys/*.key"))
