"""The ML tasks voxelflow trains, one class each, by the name a configuration gives
(``TrainConfig.task``). A new task is a module with a :class:`~models.tasks.base.Task`
subclass and a line here."""

from __future__ import annotations

from models.tasks.autoencoder import Autoencoder
from models.tasks.base import RunData, Task, class_weights
from models.tasks.classification import Classification
from models.tasks.gan import GAN
from models.tasks.segmentation import Segmentation
from voxelflow.errors import SettingError

TASKS: dict[str, type[Task]] = {t.name: t for t in (Segmentation, Classification, Autoencoder, GAN)}

__all__ = ["TASKS", "RunData", "Task", "class_weights", "task_class", "task_for", "build_networks"]


def task_class(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise SettingError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None


def task_for(config, num_classes: int = 2) -> Task:
    """The task a ``TrainConfig`` trains, for a problem of ``num_classes`` classes."""
    return task_class(config.task)(config, num_classes)


def build_networks(config, num_classes: int = 2) -> dict:
    """The networks of ``config``'s task, freshly initialised, by name (``"model"``, or a
    GAN's ``"generator"`` and ``"discriminator"``)."""
    return task_for(config, num_classes).networks()
