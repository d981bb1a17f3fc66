"""What the nightly pipeline runs, as one configuration (the flow lives in ``flows/nightly.py``).

ingest new data -> attach labels and extend the split -> preprocess -> train each model
(evaluated on the test split, promoted only if better on validation) -> infer with each
model's current version on the volumes it has not predicted yet (new or changed ones).

Every stage is safe to re-run: ingest and preprocessing skip what is unchanged, the split
keeps every patient where it was, training resumes or reuses a finished version, inference
skips volumes already predicted from the same voxels by the same model version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from voxelflow.errors import ConfigurationError


class ModelSpec(BaseModel):
    """One model the nightly run trains: a registry name, a task and TrainConfig settings."""

    model_config = ConfigDict(frozen=True)

    name: str
    task: str = "segmentation"
    settings: dict[str, Any] = Field(default_factory=dict)
    world_size: int = Field(1, ge=1)  # data-parallel ranks (Dask workers) per model
    folds: int | None = Field(None, ge=2)  # k-fold cross-validation inside the train split
    # infer with the ensemble of the folds (mean probabilities); needs folds
    ensemble: bool = False

    @model_validator(mode="after")
    def _ensemble_of_folds(self) -> ModelSpec:
        if self.ensemble and not self.folds:
            raise ValueError(f"model {self.name!r}: ensemble inference needs folds")
        return self

    def predicts(self) -> bool:
        """Whether this model's task predicts stored volumes (bulk inference runs for it)."""
        from models.tasks import task_class  # torch and MONAI: only when a model is looked at

        return task_class(self.task).predicts


class NightlyConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    sources: list[str]
    store: str
    secret_file: str | None = None
    scratch: str | None = None
    segmentations: str | None = Field(None, description="manifest CSV: image -> segmentation file")
    classes: str | None = Field(None, description="CSV: series_instance_uid -> label")
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    preprocess: dict[str, Any] = Field(default_factory=dict, description="PreprocessConfig settings")
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(name="segmentation")])
    infer: bool = True
    gpu: bool | None = None  # None: use a GPU worker when the machine has one

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> NightlyConfig:
        """A JSON file (paths in it are taken relative to the file), with overrides."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigurationError(f"nightly configuration {path}: {exc}") from exc
        base = path.resolve().parent
        for key in ("store", "secret_file", "scratch", "segmentations", "classes"):
            if data.get(key) and "://" not in data[key]:
                data[key] = str((base / data[key]).resolve())
        data["sources"] = [s if "://" in s else str((base / s).resolve()) for s in data.get("sources", [])]
        return cls(**(data | overrides))

    def ingest_config(self):
        from voxelflow.ingest import IngestConfig

        return IngestConfig(sources=self.sources, store=self.store, scratch=self.scratch,
                            secret_file=self.secret_file)

    def preprocess_config(self):
        from voxelflow.preprocess import PreprocessConfig

        settings = {"labelled_only": True} | dict(self.preprocess)
        return PreprocessConfig(store=self.store, **settings)

    def train_run(self, spec: ModelSpec, version: str):
        from models.config import TrainConfig, undot
        from models.run import TrainRun

        return TrainRun(store=self.store, version=version, name=spec.name, world_size=spec.world_size,
                        folds=spec.folds, train=TrainConfig(**({"task": spec.task} | undot(spec.settings))))

    def infer_config(self, spec: ModelSpec):
        from models.infer import InferConfig

        return InferConfig(store=self.store, name=spec.name, ensemble="latest" if spec.ensemble else None)


def attach_labels(config: NightlyConfig) -> dict[str, Any]:
    """Attach the manifests' segmentations and classes (re-attaching is idempotent) and give new
    patients a split, keeping every earlier patient where it was."""
    from voxelflow import labels
    from voxelflow.ingest import store_key

    out: dict[str, Any] = {"segmentations": 0, "classes": 0, "errors": []}
    if not (config.segmentations or config.classes):
        return out
    key = store_key(config.store, config.secret_file)
    if config.segmentations:
        rows, errors = labels.import_segmentations(config.store, config.segmentations, key)
        out["segmentations"] = len(rows)
        out["errors"] += [f"{e['segmentation']}: {e['reason']}" for e in errors]
    if config.classes:
        rows, errors = labels.import_classes(config.store, config.classes, key)
        out["classes"] = len(rows)
        out["errors"] += [f"{e['image']}: {e['reason']}" for e in errors]
    split = labels.make_split(config.store, seed=config.split_seed, fractions=config.split, keep_existing=True)
    counts: dict[str, int] = {}
    for r in split:
        counts[r["split"]] = counts.get(r["split"], 0) + 1
    out["split"] = counts
    return out
