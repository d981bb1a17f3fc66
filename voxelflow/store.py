"""The store: one OME-Zarr (NGFF 0.6, Zarr v3) image group per volume, plus the catalog.

Layout::

    STORE/
      zarr.json                 root group; attributes: voxelflow format, store id
      volumes/zarr.json         group of all volumes
      volumes/<volume_id>/      OME-Zarr multiscale image: s0, s1, ... (axes [t,] z, y, x)
      catalog/volumes.parquet   one row per volume       (see voxelflow.catalog)
      catalog/files.parquet     one row per input file
      .staging/                 volumes being written; invisible to readers

Arrays are kept in NGFF axis order ``([t,] z, y, x)``. The exact voxel-to-world affine (RAS
mm, index order (x, y, z) = (last array axis, ..., )) is stored in the group attributes under
``voxelflow.affine``, which :func:`open_volume` reads; the NGFF 0.6 metadata says the same
geometry to other readers as coordinate systems and an ``affine`` transformation (see
:mod:`voxelflow.ngff`). Stores written before hold NGFF 0.5, whose scale and translation could
not carry the affine: they open the same way, since ``voxelflow.affine`` was there already.

A volume becomes visible only once complete: it is written under ``.staging/`` and renamed
into ``volumes/`` in one step (a rename is atomic on a local filesystem), so a killed run
never leaves a half-written volume where readers look. A store on object storage
(``s3://...``, see :mod:`voxelflow.location`) has no rename: a volume is written under its
final prefix, and the catalog row written after it is what makes it part of the store.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from voxelflow import location, ngff
from voxelflow.errors import NotInStoreError, StoreError
from voxelflow.geometry import level_affine, voxel_sizes  # noqa: F401 - voxel_sizes re-exported

STORE_FORMAT = "voxelflow-store/1"
NGFF_VERSION = ngff.NGFF_VERSION
DEFAULT_CHUNK = 64
MIN_LEVEL_SIZE = 32  # stop the pyramid when every spatial axis is at most this long


def compressor() -> BloscCodec:
    # zstd level 1 with byte shuffle: nearly level 3's ratio at a multiple of its speed, and a
    # better ratio than lz4 (bench/ingest.py; README, "Why the defaults"); zstd decompresses
    # at the same speed whatever the level.
    return BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle)


# ----------------------------------------------------------------------------- store


def init_store(path: str | os.PathLike) -> str:
    """Create the store at ``path`` if needed and return its id (a UUID).

    Raises:
        StoreError: the store cannot be created or is not a voxelflow store.
    """
    root = location.path(path)
    try:
        if (root / "zarr.json").exists():
            return store_id(root)
        if root.exists() and any(not p.name.startswith(_INIT_PREFIX) for p in root.iterdir()):
            raise StoreError(f"{root} exists, is not empty and is not a voxelflow store")
        location.makedirs(root)
        sid = str(uuid.uuid4())
        if location.is_url(path):  # object storage has no exclusive create: the last writer's id wins
            zarr.open_group(store=str(root), mode="w", zarr_format=3).attrs["voxelflow"] = \
                {"format": STORE_FORMAT, "store_id": sid}
        else:
            _create_exclusively(root, sid)
        sid = store_id(root)  # another run's, when it created the store first
        try:
            zarr.open_group(store=str(root), mode="a", zarr_format=3).require_group("volumes")
        except zarr.errors.ContainsGroupError:
            pass  # another first run created it between the check and the write
        location.makedirs(root / "catalog")
        return sid
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot create store at {root}: {exc.strerror or exc}") from exc


_INIT_PREFIX = ".init-"


def _create_exclusively(root: Path, sid: str) -> None:
    """Write the store's root metadata unless another process did first: the metadata is
    made aside and hard-linked into place, which fails if ``zarr.json`` exists, so two first
    runs into one new store agree on one store id."""
    aside = root / f"{_INIT_PREFIX}{uuid.uuid4().hex}"
    try:
        zarr.open_group(store=str(aside), mode="w", zarr_format=3).attrs["voxelflow"] = \
            {"format": STORE_FORMAT, "store_id": sid}
        try:
            os.link(aside / "zarr.json", root / "zarr.json")
        except FileExistsError:
            pass
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def store_id(path: str | os.PathLike) -> str:
    """Id of an existing store.

    Raises:
        StoreError: no voxelflow store at ``path``.
    """
    meta = location.path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except FileNotFoundError:
        raise StoreError(f"no voxelflow store at {path} (missing zarr.json)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {meta}: {exc}") from exc
    info = attrs.get("voxelflow", {})
    if info.get("format") != STORE_FORMAT:
        raise StoreError(f"{path} is a Zarr group but not a voxelflow store (format={info.get('format')!r})")
    return info["store_id"]


def volume_path(store: str | os.PathLike, volume_id: str) -> Path:
    return location.path(store) / "volumes" / volume_id


def _staging(root: Path, target: Path, name: str) -> Path:
    """Where to write before publishing: aside under ``.staging/`` locally; on object storage
    the target itself (emptied first), as there is no atomic rename there."""
    if location.is_url(root):
        location.remove_tree(target)
        return target
    # writer's host and process in the name, so clean_staging knows what a dead run left
    return root / ".staging" / f"{name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex}"


def _host() -> str:
    return socket.gethostname().replace(".", "-")


def clean_staging(store: str | os.PathLike, max_age_s: float = 86400.0) -> int:
    """Remove what killed writers left in ``.staging/`` (never visible to readers): entries of
    processes on this host that no longer run, and entries older than ``max_age_s`` from other
    hosts. Returns how many were removed."""
    import time

    staging = location.path(store) / ".staging"
    if location.is_url(store) or not staging.is_dir():
        return 0
    host, removed = _host(), 0
    for entry in staging.iterdir():
        parts = entry.name.split(".")
        try:
            pid = int(parts[-2])
            same_host = parts[-3] == host
        except (ValueError, IndexError):
            pid, same_host = -1, False
        if same_host:
            try:
                os.kill(pid, 0)
                continue  # its writer still runs
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif time.time() - entry.stat().st_mtime < max_age_s:
            continue
        location.remove_tree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed += 1
    return removed


# ----------------------------------------------------------------------------- pyramid


def pyramid_factors(spacing: tuple[float, ...], shape: tuple[int, ...],
                    min_size: int = MIN_LEVEL_SIZE, max_levels: int = 8) -> list[tuple[int, ...]]:
    """Per-level halving factors (relative to the previous level) over spatial axes.

    An axis is halved only while its spacing is within 2x of the finest axis (nnU-Net's
    rule), so a thick-slice axis waits until the in-plane axes have caught up with it, and
    never below one voxel.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    size = np.asarray(shape, dtype=np.int64)
    steps: list[tuple[int, ...]] = []
    while len(steps) + 1 < max_levels and size.max() > min_size:
        finest = spacing.min()
        f = np.where((spacing / finest < 2.0) & (size >= 2), 2, 1)
        if (f == 1).all():
            break
        steps.append(tuple(int(v) for v in f))
        spacing = spacing * f
        size = -(-size // f)
    return steps


def _pair_sum(a: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    """Sum of neighbouring pairs along ``axis`` in ``dtype``; an odd last element counts
    twice (edge replication). Adding two strided views is far faster than reshape + mean."""
    n = a.shape[axis]
    half = n // 2
    shape = list(a.shape)
    shape[axis] = half + n % 2
    out = np.empty(shape, dtype=dtype)  # C order: the next axis' pass reads it contiguously
    src, dst = np.moveaxis(a, axis, 0), np.moveaxis(out, axis, 0)
    np.add(src[0:2 * half:2], src[1:2 * half:2], out=dst[:half], dtype=dtype)
    if n % 2:
        np.add(src[-1], src[-1], out=dst[-1], dtype=dtype)
    return out


def downsample(data: np.ndarray, factors: tuple[int, ...], slab: int = 8) -> np.ndarray:
    """Mean of 2-blocks over the trailing ``len(factors)`` axes (factors are 1 or 2); odd
    edges are padded by replication.

    Integer input is accumulated exactly and rounded half up back to its dtype (a mean of
    in-range values stays in range). The work goes in slabs of ``slab`` output planes along
    the first axis, so each pass runs on data that stays in the CPU cache (2.2x faster than
    whole-array passes on a 300x512x512 CT); slabs start at even planes, so no block spans two.
    """
    if any(f not in (1, 2) for f in factors):
        raise ValueError(f"factors must be 1 or 2, got {factors}")
    lead = data.ndim - len(factors)
    if all(f == 1 for f in factors):
        return data.copy()
    f0 = factors[0] if lead == 0 else 1
    step = slab * f0
    out = None
    for start in range(0, data.shape[0], step):
        block = _downsample_block(data[start:start + step], factors, lead)
        if out is None:
            out = np.empty((-(-data.shape[0] // f0),) + block.shape[1:], dtype=data.dtype)
        out[start // f0:start // f0 + block.shape[0]] = block
    return out


def _downsample_block(data: np.ndarray, factors: tuple[int, ...], lead: int) -> np.ndarray:
    if data.dtype.kind in "iu":
        acc_dtype = np.dtype(np.int64 if data.dtype.itemsize >= 4 else np.int32)
    else:
        acc_dtype = np.dtype(np.float64 if data.dtype.itemsize >= 8 else np.float32)
    acc = data
    count = 1
    for i, f in enumerate(factors):
        if f == 2:
            acc = _pair_sum(acc, lead + i, acc_dtype)
            count *= 2
    if data.dtype.kind in "iu":
        # floor((sum + count/2) / count): round half up, exact in integers
        acc += count // 2
        acc //= count
        return acc.astype(data.dtype)
    return (acc / count).astype(data.dtype)


def downsample_labels(data: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Majority label of each 2-block (ties go to the higher label, so small structures
    survive), odd edges replicated. Used for label pyramids, where a mean would invent
    labels."""
    lead = data.ndim - len(factors)
    values = np.unique(data)
    best = None
    best_count = None
    for v in values:  # label maps hold few values: one count volume per value
        count = (data == v).astype(np.uint8)
        for i, f in enumerate(factors):
            if f == 2:
                count = _pair_sum(count, lead + i, np.dtype(np.uint8))
        if best is None:
            best = np.full(count.shape, v, dtype=data.dtype)
            best_count = count
        else:
            take = count >= best_count
            best[take] = v
            best_count = np.where(take, count, best_count)
    return best


# ----------------------------------------------------------------------------- volumes


@dataclass
class VolumeInfo:
    volume_id: str
    shape: tuple[int, ...]
    dtype: str
    spacing: tuple[float, ...]  # (x, y, z) mm
    digest: str
    levels: int


def content_digest(data: np.ndarray) -> str:
    """Digest of a volume's voxels, shape and dtype (independent of chunking/compression).
    XXH3-128: ~16 GB/s here against ~1.6 GB/s for SHA-256 (7 % of a CT ingest); it tells
    contents apart, it is not meant to resist forgery."""
    h = xxhash.xxh3_128()
    h.update(f"{data.dtype.str}|{data.shape}".encode())
    h.update(np.ascontiguousarray(data).data)
    return "xxh3:" + h.hexdigest()


def _write_multiscale(group: zarr.Group, data: np.ndarray, spacing_zyx: tuple[float, ...],
                      steps: list[tuple[int, ...]], reduce, chunk: int,
                      time_step: float | None, channels: str | None = None) -> list[ngff.Level]:
    """Write ``s0, s1, ...`` into ``group``; returns where each level lies on the grid."""
    dim_names = [a["name"] for a in ngff.array_axes(data.ndim, channels)]
    levels = []
    level = data
    total = np.ones(3, dtype=np.int64)
    for n in range(len(steps) + 1):
        if n:
            level = reduce(level, steps[n - 1])
            total = total * np.asarray(steps[n - 1])
        chunks = tuple(min(chunk, s) for s in level.shape[-3:])
        if level.ndim == 4:
            chunks = (1,) + chunks
        arr = group.create_array(
            name=f"s{n}", shape=level.shape, dtype=level.dtype, chunks=chunks,
            compressors=compressor(), fill_value=0, dimension_names=dim_names)
        arr[...] = level
        scale = [float(s) * int(f) for s, f in zip(spacing_zyx, total)]
        translation = [float(s) * (int(f) - 1) / 2.0 for s, f in zip(spacing_zyx, total)]
        if data.ndim == 4:
            scale.insert(0, 1.0 if channels else float(time_step or 1.0))
            translation.insert(0, 0.0)
        levels.append(ngff.Level(path=f"s{n}", scale=tuple(scale), translation=tuple(translation)))
    return levels


def write_volume(store: str | os.PathLike, volume_id: str, data: np.ndarray, affine: np.ndarray,
                 *, time_step: float | None = None, attributes: dict[str, Any] | None = None,
                 chunk: int = DEFAULT_CHUNK, channels: str | None = None) -> VolumeInfo:
    """Write one volume as an OME-Zarr multiscale image, atomically.

    Args:
        store: the store root.
        volume_id: name of the volume's group under ``volumes/``.
        data: voxels in NGFF order, ``(z, y, x)``, ``(t, z, y, x)`` or, with ``channels``,
            ``(c, z, y, x)``.
        affine: 4x4 RAS affine of index ``(x, y, z)`` (= reversed spatial array axes).
        time_step: seconds between time points for 4-D data.
        attributes: extra JSON-able metadata stored under ``voxelflow`` (must hold no PHI).
        chunk: edge length of the cubic chunks (spatial axes; one time point per chunk).
        channels: what the first axis of 4-D data holds when it is not time, e.g. ``"RGB"``
            (a colour map: an NGFF channel axis, exported as NIfTI RGB24).

    Raises:
        StoreError: the volume cannot be written.
    """
    if data.ndim not in (3, 4):
        raise ValueError(f"volume {volume_id}: expected 3-D or 4-D data, got shape {data.shape}")
    root = location.path(store)
    spacing_xyz = voxel_sizes(affine)
    if not (spacing_xyz > 0).all():
        raise ValueError(f"volume {volume_id}: affine has an index axis of zero length (voxel sizes "
                         f"{spacing_xyz.tolist()} mm); expected a non-degenerate 4x4 affine")
    spacing_zyx = tuple(float(v) for v in spacing_xyz[::-1])
    steps = pyramid_factors(spacing_zyx, data.shape[-3:])
    digest = content_digest(data)
    target = volume_path(root, volume_id)
    staging = _staging(root, target, volume_id)
    try:
        location.makedirs(staging.parent)
        group = zarr.open_group(store=str(staging), mode="w", zarr_format=3)
        levels = _write_multiscale(group, data, spacing_zyx, steps, downsample, chunk, time_step, channels)
        meta = dict(attributes or {})
        meta.update({
            "affine": np.asarray(affine, dtype=np.float64).tolist(),
            "affine_index_order": ["x", "y", "z"],
            "digest": digest,
            "time_step": time_step,
        } | ({"channels": channels} if channels else {}))
        group.attrs.update({
            "ome": ngff.image_metadata(volume_id, levels, affine, spacing_xyz, channels=channels),
            "voxelflow": meta,
        })
        _publish(staging, target)
    except OSError as exc:
        location.remove_tree(staging)
        raise StoreError(f"cannot write volume {volume_id} into {root}: {exc}") from exc
    return VolumeInfo(volume_id=volume_id, shape=tuple(data.shape), dtype=str(data.dtype),
                      spacing=tuple(float(v) for v in spacing_xyz), digest=digest,
                      levels=len(steps) + 1)


def write_label(store: str | os.PathLike, volume_id: str, name: str, labels: np.ndarray,
                properties: list[dict[str, Any]] | None = None, chunk: int = DEFAULT_CHUNK,
                attributes: dict[str, Any] | None = None) -> str:
    """Store a label map as the OME-Zarr label image ``volumes/<id>/labels/<name>``.

    ``labels`` must be on the volume's grid, in its array order ``(z, y, x)``; the pyramid has
    the image's levels, reduced by majority vote, and the image's world geometry. Written
    aside and renamed into place. Written in the image's NGFF version (0.5 for a volume of an
    older store), as one hierarchy must not mix versions. Returns the label's digest.

    Raises:
        StoreError: the volume does not exist or the label cannot be written.
        UnsupportedDataError: the volume's NGFF version is not one voxelflow reads.
        ValueError: the label's shape differs from the volume's.
    """
    root = location.path(store)
    image = zarr.open_group(store=str(volume_path(root, volume_id)), mode="r", zarr_format=3)
    version = ngff.version_of(image.attrs.asdict(), volume_path(root, volume_id))
    base = image[list_levels(image)[0]["path"]]
    if tuple(labels.shape) != tuple(base.shape[-3:]):
        raise ValueError(f"label {name} of volume {volume_id}: shape {labels.shape} differs from the "
                         f"volume's {base.shape[-3:]}")
    affine = np.asarray(image.attrs["voxelflow"]["affine"], dtype=np.float64)
    spacing_xyz = voxel_sizes(affine)
    spacing_zyx = tuple(float(v) for v in spacing_xyz[::-1])
    steps = pyramid_factors(spacing_zyx, labels.shape)
    labels_dir = volume_path(root, volume_id) / "labels"
    staging = _staging(root, labels_dir / name, f"{volume_id}.label")
    values = [int(v) for v in np.unique(labels) if v != 0]
    palette = [[230, 25, 75, 255], [60, 180, 75, 255], [0, 130, 200, 255], [245, 130, 48, 255],
               [145, 30, 180, 255], [70, 240, 240, 255], [240, 50, 230, 255], [210, 245, 60, 255]]
    try:
        location.makedirs(staging.parent)
        group = zarr.open_group(store=str(staging), mode="w", zarr_format=3)
        levels = _write_multiscale(group, labels, spacing_zyx, steps, downsample_labels, chunk, None)
        group.attrs.update({"ome": ngff.label_metadata(
            name, levels, affine, spacing_xyz,
            colors=[{"label-value": v, "rgba": palette[i % len(palette)]} for i, v in enumerate(values)],
            properties=properties or [{"label-value": v} for v in values], version=version),
            "voxelflow": dict(attributes or {})})
        if not (labels_dir / "zarr.json").exists():
            zarr.open_group(store=str(labels_dir), mode="a", zarr_format=3)
        _publish(staging, labels_dir / name)
        listing = zarr.open_group(store=str(labels_dir), mode="a", zarr_format=3)
        names = sorted(set(listing.attrs.get("ome", {}).get("labels", [])) | {name})
        listing.attrs["ome"] = ngff.labels_listing(names, version)
    except OSError as exc:
        location.remove_tree(staging)
        raise StoreError(f"cannot write label {name} of volume {volume_id}: {exc}") from exc
    return content_digest(labels)


def open_label(store: str | os.PathLike, volume_id: str, name: str, level: int = 0) -> zarr.Array:
    """A stored label map (lazy), on the grid of the volume's pyramid level ``level``."""
    group = zarr.open_group(store=str(volume_path(store, volume_id) / "labels" / name), mode="r",
                            zarr_format=3)
    return group[list_levels(group)[level]["path"]]


def _publish(staging: Path, target: Path) -> None:
    """Move a complete volume into place. The rename is the commit point: readers see the
    old complete volume or the new complete one, never a mixture. (On object storage the
    volume was written in place: nothing to move.)"""
    if staging == target:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        trash = staging.parent / f"trash.{uuid.uuid4().hex}"
        os.rename(target, trash)
        os.rename(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, target)


@dataclass
class Volume:
    """A stored volume: a lazy Zarr array and its exact geometry."""

    volume_id: str
    array: zarr.Array  # NGFF order ([t,] z, y, x)
    affine: np.ndarray  # RAS, index (x, y, z) of this level
    level: int
    attributes: dict[str, Any]

    @property
    def time_step(self) -> float | None:
        return self.attributes.get("time_step")

    @property
    def channels(self) -> str | None:
        """What the first of 4 axes holds when it is not time (``"RGB"``), else None."""
        return self.attributes.get("channels")

    def to_nifti_order(self) -> np.ndarray:
        """Voxels as a NIfTI-ordered ndarray ``(x, y, z[, t or c])`` (reads the whole level)."""
        data = self.array[...]
        if data.ndim == 4:
            return np.transpose(data, (3, 2, 1, 0))
        return np.transpose(data, (2, 1, 0))


def list_levels(group: zarr.Group) -> list[dict[str, Any]]:
    """The NGFF ``datasets`` of an image or label group (each has its array's ``path``), finest
    first, in NGFF 0.6 or 0.5; :func:`voxelflow.ngff.level_scale` reads a level's voxel size."""
    return ngff.datasets(group.attrs.asdict())


def open_volume(store: str | os.PathLike, volume_id: str, level: int = 0) -> Volume:
    """Open a stored volume (lazily) with the affine of the requested pyramid level.

    Reads volumes written as NGFF 0.6 and those of older stores (0.5) alike: the affine comes
    from ``voxelflow.affine``, which both hold, and the level's factors from the NGFF scales.

    Raises:
        NotInStoreError: the volume or the level is not in the store.
        UnsupportedDataError: the volume's NGFF version is not one voxelflow reads.
    """
    path = volume_path(store, volume_id)
    try:
        group = zarr.open_group(store=str(path), mode="r", zarr_format=3)
        datasets = list_levels(group)
        array = group[datasets[level]["path"]]
    except (FileNotFoundError, KeyError, IndexError) as exc:
        raise NotInStoreError(f"volume {volume_id} (level {level}) not found in {store}: {exc}") from None
    ngff.version_of(group.attrs.asdict(), path)
    attrs = dict(group.attrs["voxelflow"])
    base = np.asarray(attrs["affine"], dtype=np.float64)
    # Cumulative per-axis factors of this level, from the NGFF scales (z, y, x).
    s0 = ngff.level_scale(datasets[0])[-3:]
    sl = ngff.level_scale(datasets[level])[-3:]
    factors = [round(b / a) for a, b in zip(s0, sl)]
    affine = level_affine(base, factors[::-1])
    return Volume(volume_id=volume_id, array=array, affine=affine, level=level, attributes=attrs)
