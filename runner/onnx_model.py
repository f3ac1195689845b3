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
        check_no_external_data(path)
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


def check_no_external_data(path: Path) -> None:
    """runner.export writes self-contained graphs: a graph whose weights point to other files (ONNX external
    data, a path that could lead outside the folder) is not one of them."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as err:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise RunnerError(f"{path} is not a readable ONNX graph ({str(err).strip()[:200]}): export it again") from err
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise RunnerError(f"{path} keeps weights in other files (ONNX external data): runner graphs are self-contained; "
                          f"export it again with python -m runner.export")
