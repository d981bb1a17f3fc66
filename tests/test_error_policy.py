"""One error policy: user-facing failures are VoxelflowError subclasses mixed into the matching
builtin; tasks retry only transient storage errors; an archive's own corruption is a recorded
row, the machine's I/O errors are transient."""

from __future__ import annotations

import errno
import tarfile

import pytest

from tasks.retry import transient_only
from voxelflow.errors import (
    CorruptFileError,
    NotInStoreError,
    SettingError,
    StoreError,
    VoxelflowError,
)
from voxelflow.io import sources


class _State:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc


@pytest.mark.parametrize("exc,retried", [
    (StoreError("cannot write volume v: No space left"), True),
    (OSError(errno.EIO, "Input/output error"), True),
    (NotInStoreError("volume v not found in s"), False),  # a FileNotFoundError, but logical
    (FileNotFoundError(errno.ENOENT, "no such file"), False),
    (SettingError("split fractions must sum to 1"), False),
    (CorruptFileError("a.dcm", "truncated"), False),
    (KeyError("a bug"), False),
])
def test_only_transient_storage_errors_are_retried(exc, retried):
    assert transient_only(None, None, _State(exc)) is retried


def test_user_facing_errors_are_voxelflow_errors_and_builtins():
    assert issubclass(NotInStoreError, VoxelflowError) and issubclass(NotInStoreError, FileNotFoundError)
    assert issubclass(SettingError, VoxelflowError) and issubclass(SettingError, ValueError)


def test_a_missing_volume_is_not_in_store_not_a_transient_error(tmp_path):
    from voxelflow.store import init_store, open_volume

    init_store(tmp_path / "store")
    with pytest.raises(NotInStoreError, match="volume nosuch .* not found"):
        open_volume(tmp_path / "store", "nosuch")


def test_an_archive_decoder_error_is_a_row_and_a_machine_error_propagates(tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.bz2"
    archive.write_bytes(b"BZh9" + b"\x00" * 64)  # a bz2 stream that does not decode
    rows = sources.list_inputs([str(archive)], tmp_path / "scratch")
    assert len(rows) == 1 and rows[0].reason.startswith("archive cannot be read")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tarfile, "open", no_space)
    with pytest.raises(OSError, match="No space left"):
        sources.list_inputs([str(archive)], tmp_path / "scratch2")
