"""Patches for training, read straight from the Zarr chunks they touch.

:class:`ZarrPatchDataset` is a map-style torch ``Dataset`` of random patches:

* a patch reads only the chunks it overlaps (never a whole volume);
* with probability ``foreground_oversample`` (nnU-Net's default: one third) a patch is centred
  on a voxel of a label class (a class drawn uniformly among those present, a voxel from the
  locations preprocessing sampled), otherwise anywhere in the volume;
* ``class_balanced=True`` draws the volume's class uniformly first (for imbalanced
  classification), then a volume of that class;
* sample ``i`` of epoch ``e`` depends only on ``(seed, e, i)`` (a data-parallel rank's share,
  ``shard``, draws every ``world``-th of them): the same patches whatever the
  number of DataLoader workers or their order; arrays are opened lazily in each worker
  process, so the dataset is safe to send to worker processes;
* the store can be a local path, an fsspec URL or a zarr ``Store`` object;
* with ``cache_mb`` the decoded chunks a process has read are kept (least recently used out
  first): a training run draws thousands of patches from a few dozen volumes, and decoding
  the same chunks again is most of a patch's cost (demo store, 24x48x48 patches: 7 ms a patch
  uncached). Still only the chunks patches touch are read, each once while it stays cached.

:func:`patch_dataset` builds one from a store (or its preprocessed copy) and a split;
:func:`make_loader` wraps it in a DataLoader.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections import OrderedDict, defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from voxelflow import catalog
from voxelflow.errors import NotInStoreError, SettingError
from voxelflow.preprocess import locations_for


@dataclass
class VolumeEntry:
    volume_id: str
    shape: tuple[int, int, int]  # (z, y, x)
    label: str | None = None  # the volume's class, for classification
    locations: dict[int, np.ndarray] = field(default_factory=dict)  # label value -> (n, 3) z, y, x


def _open(store: Any, path: str) -> zarr.Array:
    group = zarr.open_group(store=store, path=path, mode="r", zarr_format=3)
    return group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]


class ZarrPatchDataset(Dataset):
    """Random patches of stored volumes (and their label maps).

    Args:
        store: the store root holding ``volumes/<id>`` (path, fsspec URL or zarr Store).
        entries: the volumes to sample from.
        patch_size: ``(z, y, x)`` voxels; volumes smaller than a patch are zero-padded.
        samples_per_epoch: the dataset's length.
        label_name: label image to return as ``"label"`` (None: images only).
        foreground_oversample: share of patches centred on a labelled voxel.
        class_balanced: draw volumes so every class is equally likely.
        classes: class names in a fixed order (their index is the returned ``"class"``).
        seed: the sampling seed.
        transform: called on each sample dict (e.g. on-the-fly augmentation).
        class_from_label: ``(label value, min voxels, positive class)``: a patch's ``"class"``
            comes from its (transformed) label patch, not the volume: the positive class when
            the patch's centre holds at least that many voxels of that value, -1 (ignored by the
            loss) when it shows only near the border, else the other class (binary only).
        focus: ``(label value, share)``: that share of the patches is centred on a voxel of that
            value (in a volume that has it; none has: no effect), drawn before any other rule; for rare findings
            such as lesions, which volume-balanced sampling shows too seldom to learn.
        cache_mb: keep up to this many MB of decoded chunks per process (0: none). Each
            DataLoader worker holds its own cache.
        label_map: label values replaced in every label patch, ``{from: to}`` (merged classes).
    """

    def __init__(self, store: Any, entries: list[VolumeEntry], patch_size: tuple[int, int, int], *,
                 samples_per_epoch: int = 256, label_name: str | None = "segmentation",
                 foreground_oversample: float = 1 / 3, class_balanced: bool = False,
                 classes: list[str] | None = None, seed: int = 0, transform=None,
                 class_from_label: tuple[int, int, str] | None = None,
                 focus: tuple[int, float] | None = None, cache_mb: float = 0,
                 label_map: dict[int, int] | None = None):
        if not entries:
            raise SettingError("ZarrPatchDataset needs at least one volume")
        self.store = store
        self.entries = entries
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_epoch = samples_per_epoch
        self.label_name = label_name
        self.foreground_oversample = foreground_oversample
        self.class_balanced = class_balanced
        self.classes = classes or sorted({e.label for e in entries if e.label is not None})
        self.seed = seed
        self.epoch = 0
        self.rank, self.world = 0, 1  # a data-parallel rank's share: ``shard``
        self.transform = transform
        self.class_from_label = class_from_label
        self.focus = focus
        self._focus_entries = [i for i, e in enumerate(entries) if focus and len(e.locations.get(int(focus[0]), ()))]
        if class_from_label is not None:
            if not label_name:
                raise SettingError("class_from_label needs label patches (label_name)")
            if len(self.classes) != 2 or class_from_label[2] not in self.classes:
                raise SettingError(f"class_from_label needs two classes including {class_from_label[2]!r}, "
                                 f"not {self.classes}")
        self._by_class: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(entries):
            if e.label is not None:
                self._by_class[e.label].append(i)
        if class_balanced and not self._by_class:
            raise SettingError("class_balanced sampling needs volumes with a class label")
        self._arrays: dict[tuple[int, str], zarr.Array] = {}
        self._pid = None
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.cache_bytes = int(cache_mb * 2**20)
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cached = 0

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Other patches in another epoch (call from the training loop)."""
        self.epoch = epoch

    def shard(self, rank: int, world: int) -> ZarrPatchDataset:
        """Rank ``rank``'s share of ``world`` data-parallel ranks: its sample ``i`` is sample
        ``i * world + rank`` of the whole epoch (``world`` times this dataset's length), so every
        rank draws other patches and each is still a pure function of (seed, epoch, rank, i)."""
        if not 0 <= rank < world:
            raise SettingError(f"rank {rank} is not one of {world} ranks")
        out = copy.copy(self)  # through __getstate__: no open arrays or cached chunks shared
        out.rank, out.world = rank, world
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = {}  # open arrays and cached chunks stay in the process that read them
        state["_chunks"], state["_cached"] = OrderedDict(), 0
        return state

    def _array(self, volume_id: str, kind: str) -> zarr.Array:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
            self._chunks, self._cached = OrderedDict(), 0
        key = (volume_id, kind)
        if key not in self._arrays:
            path = f"volumes/{volume_id}" if kind == "image" else f"volumes/{volume_id}/labels/{kind}"
            self._arrays[key] = _open(self.store, path)
        return self._arrays[key]

    # -- sampling

    def sample(self, index: int) -> tuple[int, tuple[int, int, int], bool]:
        """``(entry index, patch origin (z, y, x), foreground?)`` of sample ``index``."""
        rng = np.random.default_rng([self.seed, self.epoch, index * self.world + self.rank])
        size = np.array(self.patch_size)
        if self._focus_entries and rng.random() < self.focus[1]:
            k = self._focus_entries[int(rng.integers(len(self._focus_entries)))]
            locs = self.entries[k].locations[int(self.focus[0])]
            return k, self._origin(locs[int(rng.integers(len(locs)))] - size // 2, k), True
        if self.class_balanced:
            cls = self.classes[int(rng.integers(len(self.classes)))]
            members = self._by_class[cls] or list(range(len(self.entries)))
            k = members[int(rng.integers(len(members)))]
        else:
            k = int(rng.integers(len(self.entries)))
        entry = self.entries[k]
        shape = np.array(entry.shape)
        foreground = bool(entry.locations) and rng.random() < self.foreground_oversample
        if foreground:
            values = sorted(entry.locations)
            locs = entry.locations[values[int(rng.integers(len(values)))]]
            centre = locs[int(rng.integers(len(locs)))]
            origin = centre - size // 2
        else:
            high = np.maximum(shape - size, 0)
            origin = np.array([int(rng.integers(h + 1)) for h in high])
        return k, self._origin(origin, k), foreground

    def _origin(self, origin: np.ndarray, k: int) -> tuple[int, int, int]:
        """Keep the patch inside the volume where it fits; smaller volumes are padded."""
        shape, size = np.array(self.entries[k].shape), np.array(self.patch_size)
        origin = np.clip(origin, np.minimum(0, shape - size), np.maximum(shape - size, 0))
        return tuple(int(v) for v in origin)

    def _read(self, array: zarr.Array, origin, fill: float, key: tuple = ()) -> np.ndarray:
        lo = np.maximum(origin, 0)
        hi = np.minimum(np.array(origin) + self.patch_size, array.shape[-3:])
        if self.cache_bytes and key:
            data = self._read_cached(array, lo, hi, key)
        else:
            data = array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        if data.shape == self.patch_size:
            return data
        out = np.full(self.patch_size, fill, dtype=data.dtype)
        off = lo - np.array(origin)
        out[off[0]:off[0] + data.shape[0], off[1]:off[1] + data.shape[1], off[2]:off[2] + data.shape[2]] = data
        return out

    def _read_cached(self, array: zarr.Array, lo: np.ndarray, hi: np.ndarray, key: tuple) -> np.ndarray:
        """``array[lo:hi]`` assembled from decoded chunks, each read once while it stays in
        the cache."""
        chunks = np.array(array.chunks[-3:])
        out = np.empty(tuple(hi - lo), dtype=array.dtype)
        for idx in itertools.product(*(range(a // c, (b - 1) // c + 1) for a, b, c in zip(lo, hi, chunks))):
            start = np.array(idx) * chunks
            ck = (*key, idx)
            block = self._chunks.get(ck)
            if block is None:
                stop = np.minimum(start + chunks, array.shape[-3:])
                block = array[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
                self._chunks[ck] = block
                self._cached += block.nbytes
                while self._cached > self.cache_bytes and len(self._chunks) > 1:
                    self._cached -= self._chunks.popitem(last=False)[1].nbytes
            else:
                self._chunks.move_to_end(ck)
            a, b = np.maximum(lo, start), np.minimum(hi, start + chunks)
            out[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))] = \
                block[tuple(slice(x - s_, y - s_) for x, y, s_ in zip(a, b, start))]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, origin, foreground = self.sample(index)
        entry = self.entries[k]
        image = self._read(self._array(entry.volume_id, "image"), origin, 0, (entry.volume_id, "image"))
        item: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
                                "volume_id": entry.volume_id, "origin": torch.tensor(origin),
                                "foreground": foreground}
        if self.label_name:
            label = self._read(self._array(entry.volume_id, self.label_name), origin, 0,
                               (entry.volume_id, self.label_name))
            item["label"] = torch.from_numpy(map_labels(label, self.label_map))[None]
        # -1 for a volume without a class, so batches always collate
        item["class"] = self.classes.index(entry.label) if entry.label in self.classes else -1
        item = self.transform(item) if self.transform else item
        if self.class_from_label is not None:
            item["class"] = self._class_from_label(item["label"])
        return item

    def _class_from_label(self, label: torch.Tensor) -> int:
        """Positive when the central half of the patch (along every axis) holds enough voxels of
        the label value; -1 (left out of the loss) when the value shows only near the border,
        where a window that cuts through a lesion is neither clearly positive nor negative;
        negative otherwise. Inference slides windows with half-patch overlap, so every lesion
        lies in the centre of some window."""
        value, min_voxels, positive = self.class_from_label
        mask = label[0] == value
        if not bool(mask.any()):
            return 1 - self.classes.index(positive)
        q = [n // 4 for n in mask.shape]
        centre = mask[q[0]:mask.shape[0] - q[0], q[1]:mask.shape[1] - q[1], q[2]:mask.shape[2] - q[2]]
        return self.classes.index(positive) if int(centre.sum()) >= min_voxels else -1


def map_labels(label: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """``label`` as int64 with the values ``label_map`` names replaced (``{from: to}``)."""
    out = label.astype(np.int64)
    if label_map:
        lut = np.arange(max(int(out.max(initial=0)), *label_map) + 1, dtype=np.int64)
        for k, v in label_map.items():
            lut[int(k)] = int(v)
        out = lut[out]
    return out


# ----------------------------------------------------------------------------- building


def patch_dataset(store: str, patch_size: tuple[int, int, int], *, version: str | None = None,
                  split: str | None = None, volumes: Collection[str] | None = None, **kwargs: Any) -> ZarrPatchDataset:
    """A :class:`ZarrPatchDataset` over a store's volumes, or over its preprocessed copy
    ``version`` (whose sampled class locations drive foreground oversampling), restricted to
    one split of the catalog (and to ``volumes``, e.g. a cross-validation fold) and, when
    ``label_name`` is set (the default), to volumes that have that label. ``store`` may be a
    local path or an fsspec URL.
    """
    store = str(store)
    classes = {r["volume_id"]: r["label"] for r in catalog.read_table(store, "classes").to_pylist()}
    splits = {r["volume_id"]: r["split"] for r in catalog.read_table(store, "splits").to_pylist()}
    if split is not None and not splits:
        raise NotInStoreError(f"{store} has no split; run `voxelflow labels --split`")
    label_name = kwargs.get("label_name", "segmentation")
    if version:
        root = f"{store.rstrip('/')}/preprocessed/{version}"
        rows = catalog.preprocessed_volumes(store, version)
        # a preprocessed copy holds one label name, written where the volume had it
        labelled = {r["volume_id"] for r in rows if r.get("label_digest")}
    else:
        root = store
        rows = [r for r in catalog.read_table(store, "volumes").to_pylist() if len(r["shape"]) == 3]
        labelled = {r["volume_id"] for r in catalog.read_table(store, "labels").to_pylist()
                    if r.get("name") == label_name}
    if label_name:  # patches with labels come from volumes that have them
        rows = [r for r in rows if r["volume_id"] in labelled]
    entries = []
    for r in rows:
        vid = r["volume_id"]
        if (split is not None and splits.get(vid) != split) or (volumes is not None and vid not in volumes):
            continue
        locations = locations_for(root, vid) if version else {}
        entries.append(VolumeEntry(vid, tuple(r["shape"]), classes.get(vid), locations))
    # class indices from the whole catalog, so every split numbers the classes alike even when
    # one of them lacks a class
    kwargs.setdefault("classes", sorted(set(classes.values())) or None)
    return ZarrPatchDataset(root, entries, patch_size, **kwargs)


def make_loader(dataset: ZarrPatchDataset, batch_size: int = 2, num_workers: int = 0, **kwargs: Any) -> DataLoader:
    """A DataLoader for a patch dataset: worker processes open their own arrays; pinned
    memory when CUDA is present; workers persist across epochs."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      collate_fn=kwargs.pop("collate_fn", None), **kwargs)
