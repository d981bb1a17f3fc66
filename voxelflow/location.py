"""Where stores and sources live: a local path or an fsspec URL (``s3://bucket/prefix``, ...).

Local paths are ``pathlib.Path``; URLs are ``upath.UPath`` (universal-pathlib), which gives
the same ``/``, ``exists``, ``read_bytes``, ``glob``, ``open`` over any fsspec filesystem, so
the store code is written once. What differs is how a write becomes visible:

* on a local filesystem a file is written aside and renamed over its target (atomic);
* on object storage one PUT of one object is atomic and there is no rename (S3 copies), so
  files are written in place. A volume's group is written under its final prefix and becomes
  part of the store when the catalog row that names it is written, after its chunks.

Credentials and endpoints come from the usual places (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible servers such as MinIO,
Ceph or moto), so every Dask worker that inherits the environment reaches the same store.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


def is_url(location: Any) -> bool:
    """Whether ``location`` names a remote (fsspec) location rather than a local path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def path(location: Any) -> Path:
    """``Path`` for a local location, ``UPath`` for a URL (typed as Path: the same API)."""
    if isinstance(location, Path) or not is_url(location):
        return Path(str(location).removeprefix("file://"))
    from upath import UPath

    return UPath(str(location))


def makedirs(target: Any) -> None:
    """Create a local folder; object stores have no folders (a no-op)."""
    if not is_url(target):
        Path(target).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A temporary path beside local ``target`` that replaces it when the block ends without
    an error (a rename: readers see the old or the new file, never a part)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target: Any, data: bytes) -> None:
    """Replace ``target`` with ``data`` so readers see the old or the new bytes, never a part."""
    if is_url(target):
        path(target).write_bytes(data)
        return
    with replacing(Path(target)) as tmp:
        tmp.write_bytes(data)


def read_bytes(source: Any) -> bytes:
    return path(source).read_bytes()


def remove_tree(target: Any) -> None:
    """Delete a folder (a prefix) and all below it; missing is fine."""
    if is_url(target):
        p = path(target)
        try:
            p.fs.rm(p.path, recursive=True)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(target, ignore_errors=True)


def torch_save(obj: Any, target: Any) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(target, buffer.getvalue())


def torch_load(source: Any, **kwargs: Any) -> Any:
    import torch

    if is_url(source):
        return torch.load(io.BytesIO(read_bytes(source)), **kwargs)
    return torch.load(source, **kwargs)


def save_png(image, target: Any) -> None:
    """Save a PIL image as PNG at ``target`` (atomically, see :func:`write_bytes`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes(target, buffer.getvalue())


def read_parquet(source: Any):
    import pyarrow.parquet as pq

    if is_url(source):
        with path(source).open("rb") as fh:
            return pq.read_table(fh)
    return pq.read_table(source)


def write_parquet(table, target: Any, row_group: int = 16384) -> None:
    """Write a Parquet table (zstd) atomically (see :func:`write_bytes`), a row group at a time."""
    write_parquet_stream((table.slice(start, row_group) for start in range(0, table.num_rows, row_group)),
                         table.schema, target, row_group)


def write_parquet_stream(tables: Iterable[Any], schema: Any, target: Any, row_group: int = 16384,
                         group_bytes: int = 1 << 20) -> int:
    """Write the Arrow tables of an iterator as one Parquet file (zstd) as they come, in row
    groups of ``row_group`` rows or about ``group_bytes`` bytes, whichever is reached first;
    atomically (see :func:`write_bytes`). Only one row group is held at a time, so a 10^6-row
    catalog is written in the memory of a few thousand rows. Returns the rows written.

    On object storage the encoded file is held until its single PUT."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(sink) -> int:
        written = 0
        with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
            pending: list = []
            rows = size = 0
            for table in tables:
                if not table.num_rows:
                    continue
                pending.append(table)
                rows, size = rows + table.num_rows, size + table.nbytes
                while pending and (rows >= row_group or size >= group_bytes):
                    joined = pa.concat_tables(pending)
                    per_row = max(1, size // rows)
                    take = min(rows, row_group, max(1, group_bytes // per_row))
                    writer.write_table(joined.slice(0, take), row_group_size=take)
                    written += take
                    rest = joined.slice(take)
                    pending = [rest] if rest.num_rows else []
                    rows, size = rest.num_rows, per_row * rest.num_rows
                    # Arrow's allocator keeps freed pages for reuse: each group written would
                    # stay resident until the process ends
                    pa.default_memory_pool().release_unused()
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=row_group)
                written += rows
        return written

    if is_url(target):
        sink = pa.BufferOutputStream()
        written = write(sink)
        write_bytes(target, sink.getvalue().to_pybytes())
        return written
    with replacing(Path(target)) as tmp:
        return write(str(tmp))
