"""What to ingest and where (:class:`IngestConfig`), and the store and its key."""

from __future__ import annotations


from pydantic import BaseModel, ConfigDict, Field, field_validator

from voxelflow import location
from voxelflow.deid import KEY_CLAIM, claim_store, create_key, key_path, load_key
from voxelflow.errors import ConfigurationError
from voxelflow.store import clean_staging, init_store, store_id

# Tasks per stage at most: each Prefect task costs a fixed share of API calls and scheduling
# (README, "Why the defaults"), so a 10^6-file archive in small batches would spend longer
# orchestrating than working.
MAX_TASKS = 64


class IngestConfig(BaseModel):
    """What to ingest and where. Passed as the ingest flow's (validated) parameter."""

    model_config = ConfigDict(frozen=True)

    sources: list[str] = Field(min_length=1, description="folders, archives or files (a source named twice "
                                                         "is read once)")
    store: str = Field(description="store root (created if missing)")
    scratch: str | None = Field(None, description="folder for unpacked archives and scan tables")
    secret_file: str | None = Field(None, description="de-identification key file")
    batch_size: int | None = Field(None, ge=1, description="files per header-scan task (default: up to 1024, "
                                                           f"8 tasks or more; never more than {MAX_TASKS} tasks)")
    files_per_task: int = Field(1024, ge=1, description="pack small series into tasks up to this many files "
                                                        f"(likewise 8 to about {MAX_TASKS} conversion tasks)")
    chunk: int = Field(64, ge=8, description="chunk edge length in voxels")
    keep_localizers: bool = Field(False, description="store localizer / scout images (as 2-D images) "
                                                     "instead of skipping them")
    resample_tilt: bool = Field(False, description="resample gantry-tilted (sheared) stacks onto an orthogonal "
                                                   "grid, as dcm2niix's _Tilt output, instead of keeping their "
                                                   "exact sheared geometry; the catalog records which was done")

    @field_validator("sources")
    @classmethod
    def _once_each(cls, sources: list[str]) -> list[str]:
        # the same source twice would list each of its files twice, under the same key
        return list(dict.fromkeys(sources))


def prepare_store(store: str, secret_file: str | None = None) -> str:
    """Create or open the store and make sure its key exists. Returns the store id.

    Clears what killed runs left in ``.staging/`` (never visible; written again by this run).

    Raises:
        StoreError: the store cannot be created.
        ConfigurationError: an existing store's key cannot be found.
    """
    sid = init_store(store)
    clean_staging(store)
    created = False
    if secret_file:
        key = load_key(sid, secret_file)
    elif key_path(sid).exists():
        key = load_key(sid)
    else:
        if (location.path(store) / "catalog" / "files.parquet").exists():
            load_key(sid)  # raises: a used store without its key would get new pseudonyms
        key, created = create_key(sid), True
    try:
        claim_store(store, key)
    except ConfigurationError:
        if created:  # the key this run made for a store another key holds is no key of it
            key_path(sid).unlink(missing_ok=True)
        raise
    return sid


def store_key(store: str, secret_file: str | None = None) -> bytes:
    """The store's de-identification key (``secret_file``'s, or the one in VOXELFLOW_HOME).

    Raises:
        ConfigurationError: no key, or a key the store is not bound to.
    """
    key = load_key(store_id(store), secret_file)
    if (location.path(store) / KEY_CLAIM).exists():
        claim_store(store, key)  # checks it: labels with another key would match no volume
    return key


