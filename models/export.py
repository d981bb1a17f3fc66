"""Export a registered model for deployment: TorchScript and ONNX, each checked against the
PyTorch model on the same input before it is kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.networks import from_config
from models.train import TrainConfig


class ParityError(RuntimeError):
    """An exported model does not reproduce the PyTorch model's outputs."""


def _sample(task: str, patch_size, latent_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if task == "gan":
        return torch.randn(2, latent_size, generator=gen)
    return torch.randn(2, 1, *patch_size, generator=gen)


def export_model(folder: str | os.PathLike, formats=("torchscript", "onnx"), atol: float = 1e-4) -> dict[str, Any]:
    """Export ``folder``'s weights (a registry version) and check parity.

    Returns ``{format: {"path", "max_abs_diff"}}``.

    Raises:
        ParityError: an export differs from the PyTorch model by more than ``atol``.
    """
    import json


    folder = Path(folder)
    info = json.loads((folder / "model.json").read_text())
    c = TrainConfig(**info["config"]["train"])
    weights = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    if c.task == "gan":
        model, _ = from_config(c)
        model.load_state_dict(weights["generator"])
    else:
        state = weights["model"]
        out = int([v for k, v in state.items() if k.endswith("weight")][-1].shape[0])
        model = from_config(c, out)
        model.load_state_dict(state)
    model.eval()
    x = _sample(c.task, c.patch_size, c.latent_size)
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
