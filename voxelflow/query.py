"""SQL over a store's catalog: DuckDB (in-process) over the catalog's Parquet tables, for a
store on disk or on object storage.

Every table of ``catalog/`` is a view under its own name (``volumes``, ``files``, ``labels``,
``classes``, ``splits``, ``predictions``, ``lesions``); a table the store does not have yet is an
empty view with its schema, so a query is valid on any store. On disk the views scan the Parquet
files lazily (DuckDB reads only the columns and row groups a query needs); on ``s3://`` the
tables are read through fsspec (the same credentials as the rest of voxelflow) rather than
DuckDB's own HTTP extension, which it downloads at run time. JSON columns (``attributes``) work
with DuckDB's JSON operators: ``attributes->>'$.Manufacturer'``.

    >>> query("store", "SELECT modality, count(*) AS volumes FROM volumes GROUP BY modality")
"""

from __future__ import annotations

import os

import pyarrow as pa

from voxelflow import catalog, location
from voxelflow.errors import SettingError, VoxelflowError


class QueryError(VoxelflowError, ValueError):
    """A catalog query DuckDB refused (a syntax error, an unknown table or column)."""


def _view(store: str | os.PathLike, name: str):
    path = catalog.catalog_dir(store) / f"{name}.parquet"
    if not location.is_url(store) and path.exists():
        import pyarrow.dataset as ds

        return ds.dataset(str(path), format="parquet")
    return catalog.read_table(store, name)


def query(store: str | os.PathLike, sql: str) -> pa.Table:
    """The result of ``sql`` over the catalog of ``store``, as an Arrow table.

    Raises:
        QueryError: DuckDB refused the query (its message says why).
        SettingError: ``store`` has no catalog.
    """
    return queries(store, {"result": sql})["result"]


def queries(store: str | os.PathLike, sql: dict[str, str]) -> dict[str, pa.Table]:
    """The results of several queries (``name: SQL``) over the catalog of ``store``, its views
    opened once (see :func:`query`)."""
    import duckdb

    if not (catalog.catalog_dir(store)).exists():
        raise SettingError(f"{store} has no catalog (is it a voxelflow store? ingest into it first)")
    con = duckdb.connect()
    try:
        for name in catalog.SCHEMAS:
            if name != "preprocessed":  # a preprocessed copy's table, not the store's
                con.register(name, _view(store, name))
        out = {}
        for name, text in sql.items():
            try:
                out[name] = con.sql(text).to_arrow_table()
            except duckdb.Error as exc:
                # one line: DuckDB's message spreads its candidates over several
                raise QueryError(f"query over the catalog of {store}: {' '.join(str(exc).split())}") from None
        return out
    finally:
        con.close()
