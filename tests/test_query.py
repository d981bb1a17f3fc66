"""SQL over the catalog (DuckDB): the questions users ask, checked against the catalog read
in Python, on a local store (the S3 store is queried in tests/test_s3.py)."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from voxelflow import catalog
from voxelflow.query import QueryError, query

# the README's three questions
PER_MODALITY = "SELECT modality, count(DISTINCT series_id) AS series, count(*) AS volumes FROM volumes GROUP BY ALL"
WITH_WARNINGS = "SELECT volume_id, modality, warnings FROM volumes WHERE len(warnings) > 0 ORDER BY volume_id"
LESIONS_ABOVE = """
SELECT p.volume_id, p.model, max(p.probabilities[2]) AS p_lesion, count(l.component) AS lesions,
       round(sum(l.volume_ml), 2) AS lesion_ml
FROM predictions p LEFT JOIN lesions l USING (volume_id, model, version)
WHERE p.probabilities[2] > 0.5 GROUP BY ALL ORDER BY p_lesion DESC"""


def test_series_per_modality_and_warnings_match_the_catalog(labelled_store):
    volumes = catalog.read_table(labelled_store, "volumes").to_pylist()
    got = {r["modality"]: (r["series"], r["volumes"]) for r in query(labelled_store, PER_MODALITY).to_pylist()}
    # NIfTI volumes have no series: SQL's count(DISTINCT) leaves their nulls out
    series = {m: len({v["series_id"] for v in volumes if v["modality"] == m and v["series_id"] is not None})
              for m in {v["modality"] for v in volumes}}
    assert got == {m: (series[m], n) for m, n in Counter(v["modality"] for v in volumes).items()}
    warned = query(labelled_store, WITH_WARNINGS).column("volume_id").to_pylist()
    assert warned == sorted(v["volume_id"] for v in volumes if v["warnings"])
    # JSON attributes through DuckDB's operators
    makers = query(labelled_store, "SELECT attributes->>'$.Manufacturer' AS maker, count(*) AS n FROM volumes "
                                   "WHERE modality = 'CT' GROUP BY ALL").to_pylist()
    assert makers == [{"maker": "voxelflow-phantom", "n": sum(v["modality"] == "CT" for v in volumes)}]


def test_tables_a_store_does_not_have_yet_are_empty_views(labelled_store, tmp_path):
    # a copy of the catalog without predictions (other tests predict into the shared store)
    shutil.copytree(catalog.catalog_dir(labelled_store), tmp_path / "store" / "catalog")
    for name in ("predictions", "lesions"):
        (tmp_path / "store" / "catalog" / f"{name}.parquet").unlink(missing_ok=True)
    store = tmp_path / "store"
    assert query(store, LESIONS_ABOVE).num_rows == 0
    assert query(store, "SELECT count(*) AS n FROM files").column("n").to_pylist() == [
        catalog.read_table(store, "files").num_rows]


def test_refused_queries_name_the_problem(labelled_store, tmp_path):
    with pytest.raises(QueryError, match='column "nope" not found'):
        query(labelled_store, "SELECT nope FROM volumes")
    with pytest.raises(ValueError, match="has no catalog"):
        query(tmp_path, "SELECT 1")


def test_voxelflow_catalog_prints_and_writes_csv_and_parquet(labelled_store, tmp_path):
    proc = run_cli("catalog", labelled_store, PER_MODALITY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "modality" in proc.stdout and "CT" in proc.stdout and "rows" in proc.stdout
    proc = run_cli("catalog", labelled_store, "SELECT volume_id, shape, spacing FROM volumes ORDER BY volume_id",
                   "--csv", tmp_path / "v.csv", "--parquet", tmp_path / "v.parquet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "v.csv").open()))
    volumes = sorted(catalog.read_table(labelled_store, "volumes").to_pylist(), key=lambda v: v["volume_id"])
    assert [r["volume_id"] for r in rows] == [v["volume_id"] for v in volumes]
    assert [json.loads(r["shape"]) for r in rows] == [v["shape"] for v in volumes]
    assert pq.read_table(tmp_path / "v.parquet").column("spacing").to_pylist() == [v["spacing"] for v in volumes]
    proc = run_cli("catalog", labelled_store, "SELEC 1")
    assert proc.returncode == 2 and "syntax error" in proc.stderr and "Traceback" not in proc.stderr
