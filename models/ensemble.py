"""Ensemble inference over the folds of a cross-validated run: the mean of the members' class
probabilities, as nnU-Net ensembles its folds.

``MeanProbabilities`` holds the members. The predictors (``models.predict.Predictor.members``)
average the probabilities each member gives for a whole volume (after its own sliding-window
blending); called on one window, it returns the log of the members' mean softmax
probabilities, so a softmax of its output is that mean. Grad-CAM of an ensemble is the mean of
its members' maps (``models.explain``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from voxelflow import registry
from voxelflow.errors import SettingError


class MeanProbabilities(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), 1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


def ensemble_info(store: str, name: str, group_id: str | None = None) -> dict[str, Any]:
    """The registry entry an ensemble predicts under: the group's id as its version, its
    members' versions, and the members' shared configuration (the operating threshold of a
    classifier: the mean of the members' thresholds)."""
    group = registry.group(store, name, group_id)
    infos = [json.loads((registry.version_dir(store, name, v) / "model.json").read_text()) for v in group["members"]]
    first = infos[0]["config"]
    for info in infos[1:]:
        other = info["config"]
        if (other["version"], other["train"]) != (first["version"], first["train"]):
            raise SettingError(f"ensemble {group['group']} of {name!r}: member {info['version']} was trained on "
                               "other data or settings than the first member")
    thresholds = [i["config"].get("threshold") for i in infos]
    config = {k: v for k, v in first.items() if k != "fold"} | {
        "threshold": float(np.mean(thresholds)) if all(t is not None for t in thresholds) else None}
    return {"name": name, "version": group["group"], "members": list(group["members"]), "config": config,
            "metrics": {"mean": group["mean"], "sd": group["sd"]}}
