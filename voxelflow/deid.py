"""De-identification: keyed pseudonyms and the allow-list of kept DICOM attributes.

Nothing that identifies a patient leaves a DICOM file on its way into the store: identifiers
(patient id, study/series UIDs) become stable pseudonyms from an HMAC with a per-store secret,
and only the technical attributes listed in :data:`TECHNICAL_ATTRIBUTES` are copied. Every
other attribute (names, dates, institution, accession numbers, free text, original UIDs) is
dropped by construction: it is never read into a record, so it cannot leak into the store,
the catalog, logs or artifacts.

The secret is kept outside the store (in ``$VOXELFLOW_HOME/keys/``, or a file the user
names), so a store can be shared without the means to re-identify it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from voxelflow import location
from voxelflow.errors import ConfigurationError

# Attributes copied into the catalog. Technical acquisition parameters only; PS3.15's Basic
# Application Level Confidentiality Profile keeps all of them.
TECHNICAL_ATTRIBUTES: tuple[str, ...] = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "PatientPosition",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "MagneticFieldStrength",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "SliceThickness",
    "KVP",
    "XRayTubeCurrent",
    "ExposureTime",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "PhotometricInterpretation",
    "BitsStored",
)

KEY_BYTES = 32


def voxelflow_home() -> Path:
    """Folder for voxelflow's per-user state (keys, local Prefect server)."""
    return Path(os.environ.get("VOXELFLOW_HOME", Path.home() / ".voxelflow"))


def key_path(store_id: str, home: Path | None = None) -> Path:
    return (home or voxelflow_home()) / "keys" / f"{store_id}.key"


def create_key(store_id: str, home: Path | None = None) -> bytes:
    """Create the secret of a new store (owner-readable only) and return it."""
    path = key_path(store_id, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(base64.b64encode(key))
    return key


def load_key(store_id: str, secret_file: str | os.PathLike | None = None,
             home: Path | None = None) -> bytes:
    """Load a store's secret.

    Raises:
        ConfigurationError: the key cannot be found; pseudonyms would not match the store's.
    """
    path = Path(secret_file) if secret_file else key_path(store_id, home)
    try:
        key = base64.b64decode(path.read_bytes().strip(), validate=True)
    except FileNotFoundError:
        raise ConfigurationError(
            f"the de-identification key of store {store_id} is not at {path}; pass the key "
            "file with --secret-file (or VOXELFLOW_SECRET_FILE) so pseudonyms stay stable"
        ) from None
    except ValueError as exc:
        raise ConfigurationError(f"key file {path} is not a base64 key: {exc}") from None
    if len(key) < 16:
        raise ConfigurationError(f"key file {path} holds {len(key)} bytes, expected >= 16")
    return key


KEY_CLAIM = "deid.json"  # in the store's root: which key the store's pseudonyms come from


def key_check(key: bytes) -> str:
    """A value that tells keys apart without revealing them (an HMAC of a constant)."""
    return hmac.new(key, b"voxelflow key check", hashlib.sha256).hexdigest()[:32]


def claim_store(store: Any, key: bytes) -> None:
    """Bind ``store`` to ``key``: the first run records the key's check value in the store
    (created exclusively on disk, so of two first runs with different keys, one wins); every
    later run must bring the same key, so pseudonyms never split.

    Raises:
        ConfigurationError: the store is bound to another key.
    """
    path = location.path(store) / KEY_CLAIM
    mine = key_check(key)
    body = json.dumps({"key_check": mine}).encode()
    if not path.exists():
        if location.is_url(store):  # no exclusive create on object storage: write, then read back
            location.write_bytes(path, body)
        else:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass  # another run claimed it first: checked below
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(body)
                    fh.flush()
                    os.fsync(fh.fileno())
                return
    theirs = _read_claim(path)
    if theirs != mine:
        raise ConfigurationError(
            f"store {store} is taken: its pseudonyms come from another de-identification key "
            f"(key check {theirs[:8]}..., this run's {mine[:8]}...); pass that key with --secret-file "
            "(or VOXELFLOW_SECRET_FILE), or use another store")


def _read_claim(path: Path) -> str:
    for _ in range(50):  # a claim being written by another run: a moment until it is complete
        try:
            return json.loads(path.read_bytes())["key_check"]
        except (ValueError, KeyError):
            time.sleep(0.1)
    raise ConfigurationError(f"{path} does not record a key check value")


@functools.lru_cache(maxsize=4096)  # a series' files share their series, study and patient
def pseudonym(key: bytes, kind: str, value: str, length: int = 16) -> str:
    """Stable keyed pseudonym, e.g. ``pseudonym(k, "patient", "12345") -> "P-3KQ..."``.

    The kind is part of the message, so equal values of different kinds do not collide.
    """
    digest = hmac.new(key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()
    text = base64.b32encode(digest).decode().rstrip("=")[:length]
    return f"{kind[0].upper()}-{text}"
