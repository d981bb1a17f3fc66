"""The labelled store the benchmarks train on: the demo's synthetic archive (``voxelflow synth``)
ingested, its segmentations and classes attached, split by patient and preprocessed, through
the library (no Prefect)."""

from __future__ import annotations

import shutil
from pathlib import Path


def labelled_store(work: Path, patients: int, mr_patients: int = 0, fractions=(0.6, 0.2, 0.2),
                   positive_fraction: float = 0.4) -> tuple[Path, str, dict]:
    """Build it in ``work`` (emptied first); returns ``(store, preprocessed version, the
    preprocessing summary)``."""
    from voxelflow.ingest import IngestConfig, run_local, store_key
    from voxelflow.labels import import_classes, import_segmentations, make_split
    from voxelflow.preprocess import PreprocessConfig, resolve
    from voxelflow.preprocess import run_local as preprocess
    from voxelflow.synth import SynthConfig, build_synthetic_archive

    shutil.rmtree(work, ignore_errors=True)
    archive = build_synthetic_archive(work / "archive", SynthConfig(patients=patients, mr_patients=mr_patients,
                                                                    positive_fraction=positive_fraction))
    store = work / "store"
    run_local(IngestConfig(sources=[str(archive / "images")], store=str(store)))
    key = store_key(str(store))
    import_segmentations(store, archive / "labels" / "segmentations.csv", key)
    import_classes(store, archive / "labels" / "labels.csv", key)
    make_split(store, seed=0, fractions=fractions)
    config = resolve(PreprocessConfig(store=str(store), labelled_only=True))
    summary = preprocess(config)
    return store, config.version(), summary
