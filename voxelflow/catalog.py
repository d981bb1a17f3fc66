"""The catalog: Parquet tables inside the store.

* ``catalog/volumes.parquet``: one row per volume (:data:`VOLUME_COLUMNS`).
* ``catalog/files.parquet``: one row per input file (:data:`FILE_COLUMNS`), ``status`` in
  ``converted | skipped | failed`` with a ``reason`` for the last two.
* ``catalog/labels.parquet``, ``classes.parquet``, ``splits.parquet``: segmentations stored
  as ``labels/`` of their volume, per-volume classes, the patient-level split (see
  :mod:`voxelflow.labels`).

Tables are replaced atomically (written aside, then renamed). A new run's rows replace the
rows with the same key (``volume_id``; ``source`` + ``path``); other rows are kept.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from voxelflow import location
from voxelflow.sorted_parquet import conform, is_sorted, merge_sorted, release_arrow_memory

VOLUME_SCHEMA = pa.schema([
    ("volume_id", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("series_id", pa.string()),
    ("stack", pa.string()),
    ("kind", pa.string()),  # dicom | nifti
    ("modality", pa.string()),
    ("shape", pa.list_(pa.int64())),  # NGFF order ([t,] z, y, x)
    ("spacing", pa.list_(pa.float64())),  # (x, y, z) mm
    ("orientation", pa.string()),
    ("dtype", pa.string()),
    ("levels", pa.int64()),
    ("affine", pa.list_(pa.float64())),  # 16 values, row-major
    ("n_files", pa.int64()),
    ("source_files", pa.list_(pa.string())),
    ("digest", pa.string()),
    ("attributes", pa.string()),  # JSON of allow-listed technical DICOM attributes
    ("warnings", pa.list_(pa.string())),
    ("ingested_at", pa.timestamp("s", tz="UTC")),
])

FILE_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("path", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("volume_id", pa.string()),
    ("digest", pa.string()),  # the file's content when it was read ("xxh3:" + XXH3-128)
])

LABEL_SCHEMA = pa.schema([
    ("volume_id", pa.string()), ("name", pa.string()), ("source", pa.string()), ("format", pa.string()),
    ("values", pa.list_(pa.int64())), ("voxels", pa.list_(pa.int64())), ("mapping", pa.string()),
    ("warnings", pa.list_(pa.string())), ("digest", pa.string()),
])
CLASS_SCHEMA = pa.schema([("volume_id", pa.string()), ("label", pa.string())])
SPLIT_SCHEMA = pa.schema([("volume_id", pa.string()), ("patient_key", pa.string()), ("split", pa.string()),
                          ("seed", pa.int64())])
PREPROCESSED_SCHEMA = pa.schema([  # preprocessed/<version>/catalog/preprocessed.parquet
    ("volume_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("source_digest", pa.string()), ("label_digest", pa.string()), ("modality", pa.string()),
    ("shape", pa.list_(pa.int64())), ("spacing", pa.list_(pa.float64())), ("affine", pa.list_(pa.float64())),
    ("orientation", pa.string()), ("classes", pa.list_(pa.int64())), ("digest", pa.string()),
])
LOCATION_SCHEMA = pa.schema([  # preprocessed/<version>/catalog/locations/<volume_id>.parquet
    ("volume_id", pa.string()), ("label", pa.int64()), ("z", pa.int32()), ("y", pa.int32()), ("x", pa.int32()),
])
PREDICTION_SCHEMA = pa.schema([
    ("volume_id", pa.string()), ("model", pa.string()), ("version", pa.string()), ("task", pa.string()),
    ("label_name", pa.string()), ("classes", pa.list_(pa.string())), ("probabilities", pa.list_(pa.float64())),
    ("prediction", pa.string()), ("qc_image", pa.string()), ("created_at", pa.timestamp("s", tz="UTC")),
    ("input_digest", pa.string()),  # the preprocessed volume's content digest the model saw
    ("members", pa.list_(pa.string())),  # an ensemble's member versions (None: one version)
])
LESION_SCHEMA = pa.schema([
    ("volume_id", pa.string()), ("model", pa.string()), ("version", pa.string()), ("label", pa.int64()),
    ("component", pa.int64()), ("voxels", pa.int64()), ("volume_ml", pa.float64()),
    ("centroid_mm", pa.list_(pa.float64())), ("bbox_min_mm", pa.list_(pa.float64())),
    ("bbox_max_mm", pa.list_(pa.float64())), ("max_probability", pa.float64()),
])
SCHEMAS = {"volumes": VOLUME_SCHEMA, "files": FILE_SCHEMA, "labels": LABEL_SCHEMA, "classes": CLASS_SCHEMA,
           "splits": SPLIT_SCHEMA, "preprocessed": PREPROCESSED_SCHEMA, "predictions": PREDICTION_SCHEMA,
           "lesions": LESION_SCHEMA}

STATUSES = ("converted", "skipped", "failed")


def catalog_dir(store: str | os.PathLike) -> Path:
    return location.path(store) / "catalog"


def read_table(store: str | os.PathLike, name: str, schema: pa.Schema | None = None) -> pa.Table:
    """Read ``catalog/<name>.parquet``; an empty table with the schema when absent."""
    if schema is None:
        schema = SCHEMAS[name]
    path = catalog_dir(store) / f"{name}.parquet"
    if not path.exists():
        return schema.empty_table()
    return location.read_parquet(path)


def preprocessed_volumes(store: str | os.PathLike, version: str, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of the finished volumes (status ``done``) of preprocessed copy ``version``,
    those of one split of the store's catalog when ``split`` is given."""
    root = f"{str(store).rstrip('/')}/preprocessed/{version}"
    rows = [r for r in read_table(root, "preprocessed").to_pylist() if r["status"] == "done"]
    if split is None:
        return rows
    splits = {r["volume_id"]: r["split"] for r in read_table(store, "splits").to_pylist()}
    return [r for r in rows if splits.get(r["volume_id"]) == split]


def write_table(store: str | os.PathLike, name: str, table: pa.Table) -> None:
    """Replace ``catalog/<name>.parquet`` atomically."""
    _write_atomic(table, catalog_dir(store) / f"{name}.parquet")


def upsert(store: str | os.PathLike, name: str, rows: list[dict[str, Any]], schema: pa.Schema,
           key: tuple[str, ...]) -> pa.Table:
    """Merge ``rows`` into ``catalog/<name>.parquet`` by ``key`` and write it back."""
    table = merge(read_table(store, name, schema), rows, schema, key)
    write_table(store, name, table)
    return table


def _write_atomic(table: pa.Table, path: Path) -> None:
    location.write_parquet(table, path)


def merge(old: pa.Table, new_rows: list[dict[str, Any]] | pa.Table, schema: pa.Schema,
          key: tuple[str, ...]) -> pa.Table:
    """``old`` with the rows of ``new_rows`` replacing those of equal ``key``, sorted by key
    (for small tables held in memory; the ingest catalog is merged with :func:`merge_sorted`)."""
    new = conform(new_rows, schema) if isinstance(new_rows, pa.Table) else pa.Table.from_pylist(new_rows, schema=schema)
    if old.num_rows:
        old = conform(old, schema)
        # rows of ``old`` whose key is not in ``new``: an anti join on the keys and a row number
        # (no Python object per row; the join itself cannot carry list columns)
        index = old.select(list(key)).append_column("_row", pa.array(np.arange(old.num_rows)))
        kept = index.join(new.select(list(key)), keys=list(key), join_type="left anti")["_row"]
        new = pa.concat_tables([old.take(kept), new])
    return new.take(pc.sort_indices(new, sort_keys=[(k, "ascending") for k in key]))


def update_catalog(store: str | os.PathLike, volume_parts: list[str], file_parts: list[str],
                   sources: list[str] | None = None) -> int:
    """Merge a run's rows into the catalog and write both tables, sorted by key, streaming:
    ``volume_parts`` and ``file_parts`` are Parquet files of rows each sorted by key (a run's
    parts, see :class:`voxelflow.ingest.RunRows`), merged with the catalog a batch at a time,
    so neither is held in memory whole. A new row replaces the catalog's row of the same key;
    each table is replaced atomically.

    Returns how many earlier ``files`` rows from ``sources`` this run has no row for (files
    gone since an earlier run; their rows and volumes are kept)."""
    gone = 0
    wanted = pa.array(sorted(sources or []), pa.string())
    with tempfile.TemporaryDirectory(prefix="voxelflow-catalog-") as scratch:
        for name, parts, schema, key in (("volumes", volume_parts, VOLUME_SCHEMA, ("volume_id",)),
                                         ("files", file_parts, FILE_SCHEMA, ("source", "path"))):
            target = catalog_dir(store) / f"{name}.parquet"
            old = []
            if target.exists():
                old = [target]
                if not is_sorted(target, key):  # a table edited by hand: merge a sorted copy
                    old = [Path(scratch) / target.name]
                    location.write_parquet(merge(schema.empty_table(), read_table(store, name), schema, key), old[0])
            merged = merge_sorted(old + list(parts), schema, key, base=bool(old))

            def rows(merged=merged, counting=bool(old) and name == "files"):
                nonlocal gone
                for table in merged:
                    if counting:
                        earlier = pc.and_(pc.equal(table["_rank"], 0), pc.is_in(table["source"], value_set=wanted))
                        gone += int(pc.sum(earlier).as_py() or 0)
                    yield table.drop_columns(["_rank"])

            location.write_parquet_stream(rows(), schema, target)
            release_arrow_memory()
    return gone
