"""The exported ONNX graph behind ``runner.predict backend=onnx`` (runner/export.py writes it), and how a
session is tuned for this machine: every graph optimisation ONNX Runtime has (its transformer fusions:
attention, LayerNorm, GELU, embedding LayerNorm), one intra-op thread per core this process may use (the
cgroup's CPU quota counts: a container limited to 2 CPUs on a 64-core host gets 2 threads, not 64)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from runner.errors import RunnerError

EXPORTS = ("onnx", "merged")  # folders export writes inside a model folder: not part of the model


def available_cpus() -> int:
    """The cores this process may use: physical cores, this process's CPU affinity and the cgroup CPU quota."""
    import psutil

    count = min(psutil.cpu_count(logical=False) or os.cpu_count() or 1,
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:  # cgroup v2 (containers): "max 100000" or "200000 100000" (two CPUs)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def source_digest(folder: Path) -> str:
    """A digest of the model folder's weights and metadata: recorded at export, compared before a graph is used."""
    digest = hashlib.sha256()
    files = [p for p in folder.rglob("*") if p.is_file() and (p.suffix == ".safetensors" or p.name == "runner_model.json")]
    for path in sorted(files):
        name = path.relative_to(folder).as_posix()
        if name.split("/")[0] in EXPORTS:
            continue
        digest.update(name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def session_options(threads: int, optimized_path: Path | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # ORT_ENABLE_ALL: the transformer fusions (Attention, SkipLayerNormalization, BiasGelu, ...) and layout
    # optimisations, applied when the session is made, for this CPU
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one graph at a time: the batch is the parallelism
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def fusions(path: Path) -> dict[str, int]:
    """The fused operators ONNX Runtime makes of the graph at session creation (what export records)."""
    import tempfile

    import onnx
    import onnxruntime

    fused = {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "LayerNormalization",
             "SimplifiedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QAttention", "MatMulInteger",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul", "FusedConv", "BiasSoftmax"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        options = session_options(1, out)
        options.log_severity_level = 3  # its warning that this optimised copy is for this CPU only: it is only counted
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for node in onnx.load(str(out), load_external_data=False).graph.node:
            if node.op_type in fused:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


class OnnxModel:
    """``runner.predict backend=onnx``: the exported graph behind the Predictor's forward."""

    def __init__(self, folder: Path, file: str = "model.onnx", threads: int | None = None) -> None:  # or model.int8.onnx
        import onnxruntime

        path = folder / "onnx" / file
        if not path.exists():
            raise RunnerError(f"{path} does not exist: run python -m runner.export model_dir={folder} format=onnx first")
        check_no_external_data(path)
        self.threads = threads or available_cpus()
        self.session = onnxruntime.InferenceSession(str(path), session_options(self.threads),
                                                    providers=["CPUExecutionProvider"])
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
