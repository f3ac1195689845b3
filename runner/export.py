"""Export a saved model: one ONNX graph, or a merged (LoRA-free) runner folder.

    python -m runner.export model_dir=DIR format=onnx [quantize=int8] [output=DIR/onnx]
    python -m runner.export model_dir=DIR format=merged [output=DIR/merged]

``format=onnx`` writes ``model.onnx``: encoder + pooling (+ normalize) + head in one graph, with dynamic
batch and sequence axes. Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
encoder has them); outputs ``logits`` (a head model: class logits, or the score of a regressor) and
``embedding`` (the pooled vector). The tokenizer (``tokenizer.json``) and ``runner_model.json`` go beside
it, so ``runner.predict backend=onnx`` (runner/onnx_model.py, or any onnxruntime user) needs no PyTorch
model code. LoRA is
merged first. ``quantize=int8`` adds ``model.int8.onnx`` (dynamic int8 quantization of the matmuls).
The export traces padded examples in a batch of several texts, so a mask bug cannot hide.

``format=merged`` writes a runner model folder whose encoder is a plain Hugging Face folder (LoRA merged
into the weights; it loads with ``transformers.AutoModel`` alone) and, when the pooling allows, the
sentence-transformers files.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runner.errors import RunnerError
from runner.modes import merged_encoder

log = logging.getLogger("runner")
EXAMPLES = ["a", "a somewhat longer text, so that the first one is padded", "two words"]


@dataclass
class ExportConfig:
    model_dir: str = ""
    format: str = "onnx"  # onnx | merged
    quantize: str | None = None  # int8 (onnx only)
    output: str | None = None  # default: <model_dir>/onnx or <model_dir>/merged
    opset: int = 17
    tracking_uri: str | None = None


class Graph(nn.Module):
    """What the ONNX graph computes: token ids -> pooled embedding (-> head)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.has_head = model.head_outputs is not None

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        pooled = self.model.embed(features)
        return (self.model.head(pooled), pooled) if self.has_head else pooled


def export_onnx(folder: Path, out: Path, opset: int = 17, quantize: str | None = None) -> Path:
    from runner.artifact import load_model

    if quantize not in (None, "int8"):  # before the minutes of export, not after
        raise RunnerError(f"quantize={quantize!r}: only int8 is supported")
    model, tokenizer, meta = load_model(folder)
    if meta.get("input") == "embeddings":
        raise RunnerError(f"{folder} is a head on given embeddings: it has no encoder to export")
    if meta.get("kind") == "dual":
        return export_towers(model, tokenizer, meta, out, opset, quantize)
    model.encoder = merged_encoder(model.encoder)
    graph = Graph(model).eval()  # a new module starts in training mode: dropout in the graph otherwise
    texts = [meta.get("text_prefix", "") + t for t in EXAMPLES]
    batch = (tokenizer(texts, texts[::-1], padding=True, truncation=True, max_length=meta["max_length"], return_tensors="pt")
             if meta.get("joint") else
             tokenizer(texts, padding=True, truncation=True, max_length=meta["max_length"], return_tensors="pt"))
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
    outputs = ["logits", "embedding"] if graph.has_head else ["embedding"]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {o: {0: "batch"} for o in outputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on transformers' shape checks: the check below decides
        torch.onnx.export(graph, tuple(batch[n] for n in names), str(path), input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    tokenizer.save_pretrained(out)
    (out / "runner_model.json").write_text(json.dumps({**meta, "onnx": {"inputs": names, "outputs": outputs}}, indent=2))
    check(graph, path, batch, names)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(out / "model.int8.onnx"), weight_type=QuantType.QInt8)
    log.info("ONNX graph written to %s%s", path, " (and model.int8.onnx)" if quantize else "")
    return path


class Tower(nn.Module):
    """One tower of a dual encoder as a graph: pixel_values -> embedding, or token ids -> embedding."""

    def __init__(self, model, inputs: list[str]) -> None:
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, *tensors):
        return self.model(dict(zip(self.inputs, tensors)))


def export_towers(model, tokenizer, meta: dict, out: Path, opset: int, quantize: str | None) -> Path:
    """``image.onnx`` (pixel_values -> embedding) and ``text.onnx`` (token ids -> embedding) of a dual encoder,
    with the tokenizer, the image processor settings and runner_model.json beside them; each checked against
    PyTorch on its export batch (padded texts; images of the processor's size)."""
    from runner.dual import text_features
    from runner.images import save_processor

    out.mkdir(parents=True, exist_ok=True)
    texts = [meta.get("text_prefix", "") + t for t in EXAMPLES]
    text_batch = {k: v for k, v in text_features(tokenizer, texts, meta["max_length"], meta.get("text_padding", "longest")
                                                 ).items() if k in model.text_inputs}
    size = model.encoder.config.vision_config.image_size
    image_batch = {"pixel_values": torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))}
    written = {}
    for name, batch in (("image", image_batch), ("text", text_batch)):
        names = list(batch)
        graph = Tower(model, names).eval()
        path = out / f"{name}.onnx"
        axes = {n: {0: "batch", 1: "sequence"} if n != "pixel_values" else {0: "batch"} for n in names}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on transformers' shape checks: the check decides
            torch.onnx.export(graph, tuple(batch[n] for n in names), str(path), input_names=names,
                              output_names=["embedding"], dynamic_axes=axes | {"embedding": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        check(graph, path, batch, names)
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(path), str(out / f"{name}.int8.onnx"), weight_type=QuantType.QInt8)
        written[name] = {"file": path.name, "inputs": names, "outputs": ["embedding"]}
    tokenizer.save_pretrained(out)
    save_processor(model.image_processor, out)
    (out / "runner_model.json").write_text(json.dumps({**meta, "onnx": written}, indent=2))
    log.info("ONNX graphs written to %s (image.onnx, text.onnx%s)", out, ", int8 twins" if quantize else "")
    return out / "image.onnx"


def check(graph: Graph, path: Path, batch, names: list[str]) -> None:
    """The graph must reproduce PyTorch on the padded export batch (a broken mask shows here)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: batch[n].numpy() for n in names})
    with torch.no_grad():
        want = graph(*(batch[n] for n in names))
    want = want if isinstance(want, tuple) else (want,)
    worst = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    if worst > 1e-4:
        raise RunnerError(f"the exported graph differs from PyTorch by {worst:.2e} on the export batch: not usable")


def export_merged(folder: Path, out: Path) -> Path:
    """A runner model folder with the LoRA adapters merged into a plain encoder."""
    from runner.artifact import load_model, save_model

    model, tokenizer, meta = load_model(folder)
    if meta.get("encoder") != "adapter":
        raise RunnerError(f"{folder} has no LoRA adapter to merge (its encoder is {meta.get('encoder')!r})")
    model.encoder = merged_encoder(model.encoder)
    config_yaml = (folder / "config.yaml").read_text() if (folder / "config.yaml").exists() else None
    task = {k: meta.get(k) for k in ("task", "data_type", "joint", "threshold", "score_range", "similarity", "precision")}
    save_model(out, model, tokenizer, meta["labels"], None, meta.get("text_prefix", ""), meta["max_length"],
               config_yaml, task=task)
    if (folder / "README.md").exists():
        shutil.copy(folder / "README.md", out / "README.md")
    log.info("merged model written to %s", out)
    return out


def main(argv: list[str] | None = None) -> None:
    from runner.predict import parse_args, resolve_model_dir

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv, ExportConfig)
        folder = resolve_model_dir(cfg.model_dir, cfg.tracking_uri)
        from runner.artifact import read_meta
        from runner.model import quiet_libraries
        from runner.predict import check_writable

        read_meta(folder)
        check_writable(cfg.output or folder / cfg.format, "folder", "output")
        quiet_libraries()
        if cfg.format == "onnx":
            export_onnx(folder, Path(cfg.output or folder / "onnx"), cfg.opset, cfg.quantize)
        elif cfg.format == "merged":
            if cfg.quantize:
                raise RunnerError("quantize applies to format=onnx")
            export_merged(folder, Path(cfg.output or folder / "merged"))
        else:
            raise RunnerError(f"format={cfg.format!r}: choose onnx or merged")
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
