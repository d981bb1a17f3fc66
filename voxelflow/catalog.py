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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from voxelflow import location

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
    """``old`` with the rows of ``new_rows`` replacing those of equal ``key``, sorted by key."""
    table, order = merge_order(old, new_rows, schema, key)
    return table.take(order)


def merge_order(old: pa.Table, new_rows: list[dict[str, Any]] | pa.Table, schema: pa.Schema,
                key: tuple[str, ...]) -> tuple[pa.Table, pa.Array]:
    """:func:`merge` as the merged rows (unsorted) and the order that sorts them by key, so a
    large table can be written in sorted slices without a sorted copy of it in memory."""
    new = conform(new_rows, schema) if isinstance(new_rows, pa.Table) else pa.Table.from_pylist(new_rows, schema=schema)
    if old.num_rows == 0:
        merged = new
    else:
        old = conform(old, schema)
        # rows of ``old`` whose key is not in ``new``: an anti join on the keys and a row number
        # (no Python object per row; the join itself cannot carry list columns)
        index = old.select(list(key)).append_column("_row", pa.array(np.arange(old.num_rows)))
        kept = index.join(new.select(list(key)), keys=list(key), join_type="left anti")["_row"]
        merged = pa.concat_tables([old.take(kept), new])
    return merged, pc.sort_indices(merged, sort_keys=[(k, "ascending") for k in key])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``: columns a newer schema added (absent from a catalog written by an
    earlier version) are filled with nulls."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def update_catalog(store: str | os.PathLike, volume_rows: list[dict[str, Any]] | pa.Table,
                   file_rows: list[dict[str, Any]] | pa.Table | Any) -> None:
    """Merge a run's rows into the catalog and write both tables, sorted by key. Rows are
    dicts or Arrow tables (or anything with a ``table()`` method giving one, such as
    :class:`voxelflow.ingest.FileRows`)."""
    if hasattr(file_rows, "table"):
        file_rows = file_rows.table()
    statuses = file_rows["status"].unique().to_pylist() if isinstance(file_rows, pa.Table) \
        else [r["status"] for r in file_rows]
    bad = set(statuses) - set(STATUSES)
    if bad:
        raise ValueError(f"file rows with unknown status {sorted(bad)}; expected one of {STATUSES}")
    for name, rows, schema, key in (("volumes", volume_rows, VOLUME_SCHEMA, ("volume_id",)),
                                    ("files", file_rows, FILE_SCHEMA, ("source", "path"))):
        table, order = merge_order(read_table(store, name), rows, schema, key)
        location.write_parquet(table, catalog_dir(store) / f"{name}.parquet", order=order)
