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
from dataclasses import dataclass, field
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
    check: str | None = None  # quantize=int8: a labelled file; its metrics with the fp32 and the int8 graph are recorded
    tracking_uri: str | None = None
    data: dict = field(default_factory=dict)  # reading options of check= over the training run's data.*


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
    from runner.onnx_model import fusions, source_digest

    if quantize not in (None, "int8"):  # before the minutes of export, not after
        raise RunnerError(f"quantize={quantize!r}: only int8 is supported")
    model, tokenizer, meta = load_model(folder)
    if meta.get("input") == "embeddings":
        raise RunnerError(f"{folder} is a head on given embeddings: it has no encoder to export")
    if meta.get("kind") == "dual":
        return export_towers(model, tokenizer, meta, out, opset, quantize)
    model.encoder = merged_encoder(model.encoder)
    try:  # attention as plain matrix products: what ONNX Runtime's fusions recognise (measured no slower than SDPA's)
        model.encoder.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        pass
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
    check(graph, path, batch, names)
    if quantize:  # from the plain graph: dynamic quantization of its matrix products
        quantize_int8(path, out / "model.int8.onnx")
    offline = fuse_offline(graph, path, batch, names, model.encoder.config)
    # the digest of the weights it came from: runner.predict backend=auto takes the graph only if it still matches
    record = {"inputs": names, "outputs": outputs, "source": source_digest(folder), "fusions": fusions(path),
              "offline_fusion": offline}
    if quantize:
        record["int8_fusions"] = fusions(out / "model.int8.onnx")
    (out / "runner_model.json").write_text(json.dumps({**meta, "onnx": record}, indent=2))
    log.info("ONNX graph written to %s%s; ONNX Runtime fuses %s", path, " (and model.int8.onnx)" if quantize else "",
             ", ".join(f"{k} x{v}" for k, v in record["fusions"].items()) or "nothing")
    log.info("offline transformer fusion: %s", "kept" if offline["kept"] else "not kept" + (
        f" ({offline['why']})" if "why" in offline else
        f" (it ran {offline['ms_per_batch']['fused']} ms a batch against the plain graph's {offline['ms_per_batch']['plain']})"))
    return path


def fuse_offline(graph: Graph, path: Path, batch, names: list[str], config) -> dict:
    """ONNX Runtime's transformer optimizer (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu
    fused into one kernel each) on a copy of the graph: kept as the graph only if it reproduces PyTorch and runs
    faster here than the plain graph with the session's own fusions (on a 2-core AMD EPYC with AVX-512 it ran
    10-20% slower: the fused attention kernel loses to the plain matrix products). Returns what was measured."""
    import time

    import onnxruntime
    from onnxruntime.transformers.optimizer import optimize_model

    from runner.onnx_model import available_cpus, session_options

    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    candidate = path.with_name("model.fused.onnx")
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)  # its "Model saved to ..." lines
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(candidate))
        check(graph, candidate, batch, names)
    except Exception as err:  # noqa: BLE001  (an architecture the optimizer does not know: the plain graph stays)
        candidate.unlink(missing_ok=True)
        return {"kept": False, "why": f"not applicable ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})"}
    # a batch of the kind predict runs (64 texts of 48 tokens), best of 5 after a warm-up, one graph after the other
    ids = torch.randint(0, int(getattr(config, "vocab_size", 100) or 100), (64, 48), generator=torch.Generator().manual_seed(0))
    feed = {n: (ids if n == "input_ids" else torch.ones_like(ids) if n == "attention_mask" else torch.zeros_like(ids)
                ).numpy() for n in names}
    seconds = {}
    for name, file in (("plain", path), ("fused", candidate)):
        session = onnxruntime.InferenceSession(str(file), session_options(available_cpus()), providers=["CPUExecutionProvider"])
        session.run(None, feed)
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            session.run(None, feed)
            runs.append(time.perf_counter() - start)
        seconds[name] = min(runs)
    kept = seconds["fused"] < seconds["plain"]
    if kept:
        candidate.replace(path)
    else:
        candidate.unlink()
    return {"kept": kept, "fused_operators": fused, "ms_per_batch": {k: round(v * 1000, 2) for k, v in seconds.items()}}


def quantize_int8(path: Path, out: Path) -> None:
    """Dynamic int8 quantization of the graph's products with weights (per output channel, 7-bit range so that the
    u8 x s8 pair sums of the CPU kernels cannot saturate; activations quantized per batch at run time); the
    attention products of two activations stay fp32. Measured on an SST-2 classifier (head_only, 5,000 sentences):
    dev accuracy 0.8016 fp32, 0.7890 with 8-bit per-channel weights and every MatMul quantized, 0.7970 so."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     extra_options={"MatMulConstBOnly": True})


def int8_check(folder: Path, file: str, data: dict) -> dict:
    """The metrics of the fp32 and the int8 graph on a labelled file (runner.evaluate's, both through ONNX
    Runtime), recorded in onnx/runner_model.json and logged whenever the int8 graph is used."""
    from runner.evaluate import EvaluateConfig, evaluate

    result = {"file": str(file)}
    for backend, name in (("onnx", "fp32"), ("onnx-int8", "int8")):
        cfg = EvaluateConfig(model_dir=str(folder), backend=backend, progress=False, tracking=False,
                             data={**data, "test": file})
        result[name] = {k: round(v, 6) for k, v in evaluate(cfg)["metrics"].items()}
    record = folder / "onnx" / "runner_model.json"
    meta = json.loads(record.read_text())
    meta["onnx"]["int8_check"] = result
    record.write_text(json.dumps(meta, indent=2))
    from runner.predict import cost_line

    log.info("int8 accuracy cost: %s", cost_line(result))
    return result


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
            quantize_int8(path, out / f"{name}.int8.onnx")
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
        if cfg.check and (cfg.format != "onnx" or cfg.quantize != "int8"):
            raise RunnerError("check=FILE measures what int8 costs: it goes with format=onnx quantize=int8")
        if cfg.data and not cfg.check:
            raise RunnerError("data.* are the reading options of check=FILE: give check=FILE or drop them")
        if cfg.check and cfg.output and Path(cfg.output).resolve() != (folder / "onnx").resolve():
            raise RunnerError("check=FILE evaluates the graphs in the model's own onnx/ folder: leave output unset")
        if cfg.format == "onnx":
            export_onnx(folder, Path(cfg.output or folder / "onnx"), cfg.opset, cfg.quantize)
            if cfg.check:
                int8_check(folder, cfg.check, cfg.data)
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
