"""Export a registered model for deployment: TorchScript and ONNX, each checked against the
PyTorch model on the same input before it is kept."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import TrainConfig
from models.tasks import task_for


class ParityError(RuntimeError):
    """An exported model does not reproduce the PyTorch model's outputs."""


def export_model(folder: str | os.PathLike, formats=("torchscript", "onnx"), atol: float = 1e-4) -> dict[str, Any]:
    """Export ``folder``'s weights (a registry version) and check parity.

    Returns ``{format: {"path", "max_abs_diff"}}``.

    Raises:
        ParityError: an export differs from the PyTorch model by more than ``atol``.
    """
    folder = Path(folder)
    info = json.loads((folder / "model.json").read_text())
    c = TrainConfig(**info["config"]["train"])
    weights = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    outputs = [v for k, v in weights.get("model", {}).items() if k.endswith("weight")]
    task = task_for(c, int(outputs[-1].shape[0]) if outputs else 2)
    model = task.deployed(weights).eval()
    x = task.example_input()
    with torch.no_grad():
        want = model(x).numpy()
    results: dict[str, Any] = {}
    if "torchscript" in formats:
        path = folder / "model.torchscript.pt"
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
        traced.save(str(path))
        got = torch.jit.load(str(path))(x).detach().numpy()
        results["torchscript"] = _check(path, got, want, atol)
    if "onnx" in formats:
        import onnxruntime as ort

        path = folder / "model.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x.numpy()})[0]
        results["onnx"] = _check(path, got, want, atol)
    return results


def _check(path: Path, got: np.ndarray, want: np.ndarray, atol: float) -> dict[str, Any]:
    diff = float(np.abs(got - want).max())
    if got.shape != want.shape or not diff <= atol:
        path.unlink(missing_ok=True)
        raise ParityError(f"{path.name}: output differs from the PyTorch model by {diff:.3g} (> {atol})")
    return {"path": str(path), "max_abs_diff": diff}
