"""The listing: every input file, streamed into Parquet as it is found, with an order-free
tally of its keys for the accounting."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from voxelflow import location
from voxelflow.ingest.config import MAX_TASKS
from voxelflow.io.sources import InputFile


LISTING_SCHEMA = pa.schema([("source", pa.string()), ("path", pa.string()), ("local", pa.string()),
                            ("reason", pa.string())])
# Rows per row group of the listing (3 short strings a row): the unit a task reads at once.
LISTING_GROUP = 4096
_MASK128 = (1 << 128) - 1


class KeyTally:
    """An order-independent fingerprint of a multiset of ``(source, path)`` keys: their count
    and the sum of their XXH3-128 hashes modulo 2^128. Equal multisets give equal tallies; a
    missing, extra or duplicated key changes the sum unless 128-bit hashes collide. It lets
    accounting check 10^6 inputs against their rows without holding either set in memory."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count, self.total = 0, 0

    def add(self, sources: list[str], paths: list[str]) -> None:
        h = xxhash.xxh3_128_intdigest
        self.total = (self.total + sum(h(f"{s}\0{p}".encode("utf-8", "surrogatepass"))
                                       for s, p in zip(sources, paths))) & _MASK128
        self.count += len(paths)

    def add_table(self, table: pa.Table) -> KeyTally:
        """Add the keys of a table with ``source`` and ``path`` columns, a slice at a time."""
        for batch in table.select(["source", "path"]).to_batches(max_chunksize=65536):
            self.add(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyTally) and (self.count, self.total) == (other.count, other.total)

    def __repr__(self) -> str:
        return f"KeyTally({self.count} keys, {self.total:032x})"


class Listing:
    """The run's input files, as found, in a Parquet file in the scratch folder (row groups
    of :data:`LISTING_GROUP`): the flow and the library keep only its path, its length and the
    keys' tally, so their memory does not grow with the archive. Scan tasks read their slice.

    Attributes:
        path: the Parquet file.
        files: how many inputs it lists.
        tally: :class:`KeyTally` of its keys (what accounting checks the run's rows against).
    """

    def __init__(self, path: str, files: int, tally: KeyTally):
        self.path, self.files, self.tally = path, files, tally

    @classmethod
    def write(cls, entries: Iterable[InputFile], out_path: str | os.PathLike) -> Listing:
        """Write ``entries`` (an iterator: :func:`voxelflow.io.sources.iter_inputs`) as they come."""
        out_path = str(out_path)
        tally, group = KeyTally(), []

        def flush(writer: pq.ParquetWriter) -> None:
            columns = list(zip(*((e.source, e.path, e.local, e.reason) for e in group))) or [[]] * 4
            tally.add(columns[0], columns[1])
            writer.write_table(pa.table([pa.array(c, pa.string()) for c in columns], schema=LISTING_SCHEMA))
            group.clear()

        with location.replacing(Path(out_path)) as tmp, pq.ParquetWriter(tmp, LISTING_SCHEMA) as writer:
            for entry in entries:
                group.append(entry)
                if len(group) == LISTING_GROUP:
                    flush(writer)
            if group or not tally.count:
                flush(writer)
        return cls(out_path, tally.count, tally)

    def read(self, start: int = 0, stop: int | None = None) -> list[InputFile]:
        """Entries ``start`` to ``stop`` (reading only the row groups that hold them)."""
        return read_listing(self.path, start, self.files if stop is None else stop)

    def keys(self) -> pa.Table:
        """All ``(source, path)`` keys (to name what accounting found missing or unexpected)."""
        return pq.read_table(self.path, columns=["source", "path"])

    def batches(self, batch_size: int | None = None) -> list[tuple[int, int]]:
        """Scan batches as ``(start, stop)`` rows: ``batch_size`` files (default: up to 1024,
        in at least 8 batches so small archives spread over the workers); larger when that
        gives more than :data:`MAX_TASKS`."""
        n = self.files
        size = batch_size or max(1, min(1024, -(-n // 8)))
        size = max(size, -(-n // MAX_TASKS))
        return [(i, min(i + size, n)) for i in range(0, n, size)]


def read_listing(path: str, start: int, stop: int) -> list[InputFile]:
    """Entries ``start`` to ``stop`` of a listing file, reading only the row groups that hold them."""
    return list(iter_listing(path, start, stop))


def iter_listing(path: str, start: int, stop: int) -> Iterator[InputFile]:
    """:func:`read_listing` a row group at a time."""
    pf = pq.ParquetFile(path)
    offset = 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if offset + rows > start and offset < stop:
            table = pf.read_row_group(g)
            table = table.slice(max(start - offset, 0), min(stop, offset + rows) - max(start, offset))
            yield from (InputFile(*values) for values in zip(*(table[c].to_pylist() for c in LISTING_SCHEMA.names)))
        offset += rows
        if offset >= stop:
            break


def dump_batch(listing: Listing, start: int, stop: int) -> str:
    """A scan batch as compact JSON text (a task parameter Prefect does not walk): the listing
    file and the rows to scan, never the entries themselves."""
    return json.dumps([listing.path, start, stop])


def load_batch(text: str) -> Iterator[InputFile]:
    """The entries of a :func:`dump_batch` text, read a row group at a time."""
    path, start, stop = json.loads(text)
    return iter_listing(path, start, stop)


