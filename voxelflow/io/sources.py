"""Sources: folders, single files, zip and tar archives, as a flat list of input files.

Archives are unpacked into a scratch folder (outside the store) so every later stage reads
plain local files. A source on object storage (``s3://bucket/prefix``: a prefix or one object,
see :mod:`voxelflow.location`) is first copied into the scratch folder; the catalog still
records its URL. Each input keeps the path relative to its source root, which is what the
catalog records. Members that cannot be unpacked safely are returned as rejected entries with
a reason, so they are still accounted for.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from voxelflow import location
from voxelflow.errors import SourceError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@dataclass(frozen=True)
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
    entries: list[InputFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False,
                                                onerror=None):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink() and not full.exists():
                entries.append(InputFile(source, rel, "", "broken symbolic link"))
            else:
                entries.append(InputFile(source, rel, str(full)))
    entries.sort(key=lambda e: e.path)
    yield from entries


def _extract_member(source: str, dest: Path, name: str, refusal: str, open_member,
                    errors: tuple[type[BaseException], ...]) -> InputFile:
    """Extract one archive member into ``dest`` unless its name escapes ``dest`` or
    ``refusal`` says why it is not a plain file (a link, a device)."""
    safe = _safe_member_name(name)
    if safe is None:
        return InputFile(source, name, "", "archive member path escapes the extraction folder; not extracted")
    if refusal:
        return InputFile(source, safe, "", refusal)
    target = dest / safe
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open_member() as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except errors as exc:
        return InputFile(source, safe, "", f"cannot extract archive member: {exc}")
    return InputFile(source, safe, str(target))


def _extract_zip(source: str, archive: Path, dest: Path) -> Iterator[InputFile]:
    with zipfile.ZipFile(archive) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            link = stat.S_ISLNK(info.external_attr >> 16)
            yield _extract_member(source, dest, info.filename,
                                  "symbolic link inside archive; not followed" if link else "",
                                  lambda info=info: zf.open(info),
                                  (zipfile.BadZipFile, OSError, EOFError, NotImplementedError))


def _extract_tar(source: str, archive: Path, dest: Path) -> Iterator[InputFile]:
    with tarfile.open(archive, mode="r:*") as tf:
        for member in tf:  # streaming: works for compressed tars without seeking back
            if member.isdir():
                continue
            refusal = ("link inside archive; not followed" if member.issym() or member.islnk()
                       else "" if member.isfile() else "special file (device or fifo) inside archive")
            yield _extract_member(source, dest, member.name, refusal,
                                  lambda member=member: tf.extractfile(member),
                                  (tarfile.TarError, OSError, EOFError))


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


def list_inputs(sources: list[str], scratch: str | os.PathLike) -> list[InputFile]:
    """Every input file of every source, archives unpacked into ``scratch``.

    A source that is an unreadable archive yields one rejected entry (the archive itself), so
    it is accounted for and the other sources still run.

    Raises:
        SourceError: a source does not exist (or, on object storage, cannot be read).
    """
    scratch = Path(scratch)
    out: list[InputFile] = []
    for n, source in enumerate(sources):
        path = _fetch(source, scratch / f"remote-{n:04d}") if location.is_url(source) else Path(source)
        if not path.exists():
            raise SourceError(f"source {source!r} does not exist")
        if path.is_dir():
            out.extend(_walk_folder(source, path))
        elif is_archive(path):
            dest = scratch / f"source-{n:04d}"
            dest.mkdir(parents=True, exist_ok=True)
            extract = _extract_zip if path.name.lower().endswith(".zip") else _extract_tar
            try:
                out.extend(extract(source, path, dest))
            except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
                out.append(InputFile(source, path.name, "",
                                     f"archive cannot be read: {type(exc).__name__}: {exc}"))
        else:
            out.append(InputFile(source, path.name, str(path)))
    return out
