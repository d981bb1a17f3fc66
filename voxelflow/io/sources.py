"""Sources: folders, single files, zip and tar archives, as a flat list of input files.

Archives are unpacked into a scratch folder (outside the store) so every later stage reads
plain local files. A source on object storage (``s3://bucket/prefix``: a prefix or one object,
see :mod:`voxelflow.location`) is first copied into the scratch folder; the catalog still
records its URL. Each input keeps the path relative to its source root, which is what the
catalog records. Members that cannot be unpacked safely are returned as rejected entries with
a reason, so they are still accounted for.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from voxelflow import location
from voxelflow.errors import SourceError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# gzip-compressed single files other than archives and NIfTI (which nibabel reads as they
# are): some exports gzip each DICOM file (``IM_0001.dcm.gz``); they are read decompressed.
_NOT_GUNZIPPED = (".tar.gz", ".nii.gz")


@dataclass(frozen=True)
class ArchiveLimits:
    """Guards against decompression bombs and archive nesting, per archive (a nested archive
    counts towards its outer archive's totals).

    Attributes:
        member_bytes: most bytes one member may unpack to (a DICOM file is rarely over 1 GB).
        total_bytes: most bytes one archive may unpack to in all.
        ratio: most unpacked bytes per packed byte, for members over ``ratio_floor`` bytes
            (zip declares both sizes; tar members are checked while they stream).
        depth: how deep archives inside archives are unpacked (0: not at all).
    """

    member_bytes: int = 4 << 30
    total_bytes: int = 64 << 30
    ratio: float = 200.0
    ratio_floor: int = 16 << 20
    depth: int = 2


DEFAULT_LIMITS = ArchiveLimits()


class _Budget:
    """Unpacked bytes left to one archive (shared with the archives nested in it), and the
    names of its members that were not unpacked (members that were have their file in the
    extraction folder: a second member of the same name is found there)."""

    def __init__(self, limits: ArchiveLimits):
        self.limits, self.left = limits, limits.total_bytes
        self.not_unpacked: set[str] = set()
        self.repeats: dict[str, int] = {}


class _LimitExceeded(Exception):
    pass


def _copy_limited(src, out, limit: int, budget: _Budget) -> int:
    """Copy at most ``limit`` bytes (and what the budget allows); raises _LimitExceeded past it."""
    n = 0
    while True:
        block = src.read(1 << 20)
        if not block:
            return n
        n += len(block)
        if n > limit:
            raise _LimitExceeded(f"member unpacks to more than {limit} bytes (limit per member)")
        if n > budget.left:
            raise _LimitExceeded(f"archive unpacks to more than {budget.limits.total_bytes} bytes in all "
                                 "(limit per archive)")
        out.write(block)


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input file.

    Attributes:
        source: the source as the user gave it (folder, archive or file).
        path: posix path relative to the source root (the member name for archives).
        local: where the bytes can be read now ("" when the entry was rejected).
        reason: why the entry was rejected before reading, or "" when it is readable.
    """

    source: str
    path: str
    local: str
    reason: str = ""


def is_archive(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(ARCHIVE_SUFFIXES)


def _safe_member_name(name: str) -> str | None:
    """Normalised relative member path, or None if it would escape the extraction folder."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name)
    if norm in ("", ".") or norm == ".." or norm.startswith("../"):
        return None
    return norm


def _walk_folder(source: str, root: Path) -> Iterator[InputFile]:
    """The files under ``root`` as they are found (folders in name order, each folder's files
    by name), so a 10^6-file export is never held as one list."""
    # os.path on strings, not pathlib: pathlib interns every path component it parses, and
    # that table only grows over a walk of 10^6 files.
    top = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False, onerror=None):
        dirnames.sort()
        prefix = os.path.relpath(dirpath, top).replace(os.sep, "/")
        prefix = "" if prefix == "." else prefix + "/"
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full) and not os.path.exists(full):
                yield InputFile(source, prefix + name, "", "broken symbolic link")
            else:
                yield InputFile(source, prefix + name, full)


def _extract_member(source: str, dest: Path, name: str, refusal: str, open_member,
                    errors: tuple[type[BaseException], ...], budget: _Budget, prefix: str = "",
                    declared: tuple[int, int] | None = None) -> InputFile:
    """Extract one archive member into ``dest`` unless its name escapes ``dest``, ``refusal``
    says why it is not a plain file (a link, a device), it breaks the size limits
    (``declared``: zip's (unpacked, packed) sizes, checked before unpacking), or an earlier
    member had the same name.

    A zip or tar may hold several members of one name (or names equal once normalised:
    ``a/b``, ``./a/b``, ``a//b``). The first is the input of that name; each later one is
    recorded, not unpacked (it would overwrite the first), under the name plus ``#2``,
    ``#3``..., so every member keeps a row of its own."""
    safe = _safe_member_name(name)
    key = prefix + (name if safe is None else safe)
    target = None if safe is None else dest / safe
    if key in budget.not_unpacked or (target is not None and (
            target.is_file() or target.with_name(target.name + ".unpacked").is_dir())):
        n = budget.repeats[key] = budget.repeats.get(key, 1) + 1
        return InputFile(source, f"{key}#{n}", "", f"archive member {n} named {key!r} (names compared after "
                                                   "normalising the path): only the first one is unpacked")
    entry = _unpack_member(source, dest, name, safe, refusal, open_member, errors, budget, prefix, declared)
    if not entry.local:
        budget.not_unpacked.add(key)
    return entry


def _unpack_member(source: str, dest: Path, name: str, safe: str | None, refusal: str, open_member,
                   errors: tuple[type[BaseException], ...], budget: _Budget, prefix: str,
                   declared: tuple[int, int] | None) -> InputFile:
    if safe is None:
        return InputFile(source, prefix + name, "", "archive member path escapes the extraction folder; not extracted")
    if refusal:
        return InputFile(source, prefix + safe, "", refusal)
    limits = budget.limits
    if declared is not None:
        size, packed = declared
        if size > limits.member_bytes or size > budget.left:
            return InputFile(source, prefix + safe, "", f"decompression bomb guard: member declares {size} bytes "
                                                        f"(limits: {limits.member_bytes} per member, "
                                                        f"{budget.left} left of this archive's {limits.total_bytes})")
        if size > limits.ratio_floor and size > limits.ratio * max(packed, 1):
            return InputFile(source, prefix + safe, "", f"decompression bomb guard: member packs {size} bytes into "
                                                        f"{packed} (ratio {size / max(packed, 1):.0f}, limit "
                                                        f"{limits.ratio:.0f}); not extracted")
    target = dest / safe
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # fails where a member is named like a folder
        with open_member() as src, open(target, "wb") as out:
            budget.left -= _copy_limited(src, out, limits.member_bytes, budget)
    except _LimitExceeded as exc:
        _remove(target)
        return InputFile(source, prefix + safe, "", f"decompression bomb guard: {exc}; not extracted")
    except errors as exc:
        _remove(target)
        return InputFile(source, prefix + safe, "", f"cannot extract archive member: {exc}")
    return InputFile(source, prefix + safe, str(target))


def _remove(target: Path) -> None:
    """Remove what a failed extraction left (nothing, or no file there, is fine)."""
    with contextlib.suppress(OSError):
        target.unlink()


def _extract_zip(source: str, archive: Path, dest: Path, budget: _Budget, prefix: str = "") -> Iterator[InputFile]:
    with zipfile.ZipFile(archive) as zf:
        # in name order (as a folder is walked); members whose names are equal once normalised
        # keep the archive's order, so the first of them is the one unpacked
        infos = zf.infolist()
        order = sorted(range(len(infos)), key=lambda k: (_safe_member_name(infos[k].filename) or infos[k].filename, k))
        for info in (infos[k] for k in order):
            if info.is_dir():
                continue
            link = stat.S_ISLNK(info.external_attr >> 16)
            yield _extract_member(source, dest, info.filename,
                                  "symbolic link inside archive; not followed" if link else "",
                                  lambda info=info: zf.open(info),
                                  (zipfile.BadZipFile, OSError, EOFError, NotImplementedError), budget, prefix,
                                  declared=(info.file_size, info.compress_size))


def _extract_tar(source: str, archive: Path, dest: Path, budget: _Budget, prefix: str = "") -> Iterator[InputFile]:
    with tarfile.open(archive, mode="r:*") as tf:
        # streaming: works for compressed tars without seeking back
        while (member := tf.next()) is not None:
            tf.members.clear()  # TarFile keeps every member it has read: 10^6 of them in a big export
            if member.isdir():
                continue
            refusal = ("link inside archive; not followed" if member.issym() or member.islnk()
                       else "" if member.isfile() else "special file (device or fifo) inside archive")
            yield _extract_member(source, dest, member.name, refusal,
                                  lambda member=member: tf.extractfile(member),
                                  (tarfile.TarError, OSError, EOFError), budget, prefix)


def _extract(source: str, archive: Path, dest: Path, budget: _Budget, prefix: str = "",
             depth: int = 0) -> Iterator[InputFile]:
    """Every member of an archive, as it is unpacked, nested archives unpacked in turn (up to
    the depth limit): a nested archive's members are named ``<archive member>/<member>``. An
    archive that cannot be read (or stops being readable part-way) is one rejected entry."""
    dest.mkdir(parents=True, exist_ok=True)
    extract = _extract_zip if archive.name.lower().endswith(".zip") else _extract_tar
    try:
        for entry in extract(source, archive, dest, budget, prefix):
            if entry.local and is_archive(entry.path):
                if depth + 1 > budget.limits.depth:
                    yield InputFile(source, entry.path, "", f"archive nested deeper than "
                                                            f"{budget.limits.depth} levels; not unpacked")
                else:
                    inner = Path(entry.local)
                    yield from _extract(source, inner, inner.with_name(inner.name + ".unpacked"), budget,
                                        entry.path + "/", depth + 1)
                    inner.unlink(missing_ok=True)  # its members are the inputs now
                continue
            yield entry
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        yield _unreadable(source, archive, prefix, exc)
    except OSError as exc:
        if exc.errno is not None:
            raise  # the machine's error (no space, I/O, permission), not the archive's: transient
        yield _unreadable(source, archive, prefix, exc)  # a decoder's (bz2, gzip): corrupt data


def _unreadable(source: str, archive: Path, prefix: str, exc: BaseException) -> InputFile:
    return InputFile(source, prefix.rstrip("/") or archive.name, "",
                     f"archive cannot be read: {type(exc).__name__}: {exc}")


def _fetch(source: str, dest: Path) -> Path:
    """Copy a remote source (one object, or every object under a prefix) into ``dest``;
    returns the local file or folder.

    Raises:
        SourceError: nothing exists at ``source`` or it cannot be read.
    """
    remote = location.path(source)
    fs, key = remote.fs, remote.path
    try:
        if fs.isdir(key):
            local = dest / "prefix"
            local.mkdir(parents=True, exist_ok=True)
            fs.get(key.rstrip("/") + "/", str(local) + "/", recursive=True)
            return local
        if not fs.exists(key):
            raise SourceError(f"source {source!r} does not exist")
        dest.mkdir(parents=True, exist_ok=True)
        local = dest / remote.name
        fs.get(key, str(local))
        return local
    except (OSError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"source {source!r} cannot be read: {type(exc).__name__}: {exc}") from exc


def is_gzipped_file(path: str) -> bool:
    """A gzip-compressed single file read decompressed (``*.dcm.gz``; not ``.tar.gz`` or
    ``.nii.gz``)."""
    name = path.lower()
    return name.endswith(".gz") and not name.endswith(_NOT_GUNZIPPED)


def _gunzip(entry: InputFile, dest: Path, limits: ArchiveLimits) -> InputFile:
    """The entry with ``local`` pointing at its decompressed bytes (under ``dest``), within the
    per-member limit; a file that is not valid gzip is rejected with the reason. Its path in
    the catalog stays the compressed file's."""
    target = dest / posixpath.basename(entry.path)[:-3]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with gzip.open(entry.local, "rb") as src, open(target, "wb") as out:
            _copy_limited(src, out, limits.member_bytes, _Budget(limits))
    except (gzip.BadGzipFile, EOFError, zipfile.BadZipFile, _LimitExceeded) as exc:
        target.unlink(missing_ok=True)
        return InputFile(entry.source, entry.path, "", f"gzip-compressed file cannot be decompressed: "
                                                       f"{type(exc).__name__}: {exc}")
    return InputFile(entry.source, entry.path, str(target))


def iter_inputs(sources: list[str], scratch: str | os.PathLike,
                limits: ArchiveLimits = DEFAULT_LIMITS) -> Iterator[InputFile]:
    """Every input file of every source, yielded as it is found; archives are unpacked into
    ``scratch`` as they are reached (nested ones too, within ``limits``), and
    gzip-compressed single files (``*.dcm.gz``) decompressed there. Memory does not grow
    with the number of files (ingest writes them straight into its listing).

    A source that is an unreadable archive yields one rejected entry (the archive itself), so
    it is accounted for and the other sources still run.

    Raises:
        SourceError: a source does not exist (or, on object storage, cannot be read).
    """
    scratch = Path(scratch)
    for k, entry in enumerate(_iter_inputs(sources, scratch, limits)):
        if entry.local and is_gzipped_file(entry.path):
            yield _gunzip(entry, scratch / "gunzipped" / f"{k:07d}", limits)
        else:
            yield entry


def _iter_inputs(sources: list[str], scratch: Path, limits: ArchiveLimits) -> Iterator[InputFile]:
    """The entries of every source, gzip-compressed files still compressed."""
    for n, source in enumerate(sources):
        path = _fetch(source, scratch / f"remote-{n:04d}") if location.is_url(source) else Path(source)
        if not path.exists():
            raise SourceError(f"source {source!r} does not exist")
        if path.is_dir():
            for k, entry in enumerate(_walk_folder(source, path)):
                if entry.local and is_archive(entry.path) and limits.depth > 0:  # an archive in a folder
                    dest = scratch / f"source-{n:04d}" / f"archive-{k:06d}"
                    yield from _extract(source, Path(entry.local), dest, _Budget(limits), entry.path + "/")
                else:
                    yield entry
        elif is_archive(path):
            yield from _extract(source, path, scratch / f"source-{n:04d}", _Budget(limits))
        else:
            yield InputFile(source, path.name, str(path))


def list_inputs(sources: list[str], scratch: str | os.PathLike,
                limits: ArchiveLimits = DEFAULT_LIMITS) -> list[InputFile]:
    """:func:`iter_inputs` as a list (for small sources, tests and notebooks)."""
    return list(iter_inputs(sources, scratch, limits))
