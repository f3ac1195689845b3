"""The exported ONNX graph behind ``runner.predict backend=onnx`` (runner/export.py writes it)."""

from __future__ import annotations

from pathlib import Path

import torch

from runner.errors import RunnerError


class OnnxModel:
    """``runner.predict backend=onnx``: the exported graph behind the Predictor's forward."""

    def __init__(self, folder: Path, file: str = "model.onnx") -> None:  # or model.int8.onnx
        import onnxruntime

        path = folder / "onnx" / file
        if not path.exists():
            raise RunnerError(f"{path} does not exist: run python -m runner.export model_dir={folder} format=onnx first")
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, features: dict) -> dict[str, torch.Tensor]:
        values = self.session.run(None, {n: features[n].numpy() for n in self.inputs})
        return {name: torch.from_numpy(v) for name, v in zip(self.outputs, values)}

    def forward(self, features: list[dict], want_columns: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        first = self.run(features[0])
        pooled = [first["embedding"], *(self.run(f)["embedding"] for f in features[1:])] if want_columns else []
        return first.get("logits"), pooled
