"""Score a file or one text with a saved model.

    python -m runner.predict model_dir=DIR input=FILE output=FILE.jsonl
    python -m runner.predict model_dir=runs:/<mlflow run id> text="a gripping film"
    python -m runner.predict model_dir=DIR input=pairs.tsv embeddings=true data.text_fields=[q,a]

One JSON line per input row, in input order: ``label`` and ``probabilities`` (classifiers; ``top_k``
keeps the k most likely), ``labels`` over the saved threshold (multi-label), ``score`` in the original
range (regression and cross-encoder scores), ``similarity`` (bi-encoder pairs), ``embedding`` (embedding
models, and any model with ``embeddings=true``). The file is read with the training run's reading
options (``data.*``), which any ``data.KEY=VALUE`` overrides. Batches are sorted by length and
tokenized as at training time (runner.batching), under ``torch.inference_mode``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.errors import RunnerError, check_finite_outputs

log = logging.getLogger("runner")


@dataclass
class PredictConfig:
    model_dir: str = ""
    input: str | None = None  # a csv/tsv/jsonl/parquet file (read like training data)
    output: str | None = None  # a .jsonl file; none: standard output
    text: str | None = None  # one text instead of a file
    text_pair: str | None = None  # its pair (pair models)
    embeddings: bool = False  # add the pooled sentence vector of every row
    top_k: int | None = None  # classifiers: only the k most likely classes in "probabilities"
    batch_size: int = 64
    backend: str = "auto"  # auto (onnx when the folder holds a graph exported from these weights, else torch) | torch
    #                        | onnx | onnx-int8 (after python -m runner.export ... format=onnx [quantize=int8])
    precision: str = "auto"  # auto: as training evaluated (bf16 autocast if it did), fp32 or bf16
    progress: bool = True
    tracking_uri: str | None = None  # where runs:/<id> is looked up (default: outputs/mlflow.db)
    data: dict = field(default_factory=dict)  # reading options over the training run's data.*
    classes: list[str] | None = None  # dual encoders: zero-shot classes (default: the model's own, if any)
    prompt: str | None = None  # dual encoders: the class prompt (default: the training run's task.prompt)


def parse_args(argv: list[str], schema: type = PredictConfig):
    """``key=value`` arguments into the typed config (unknown keys and bad types are one clear error)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise RunnerError(f"arguments are key=value (model_dir=DIR input=FILE ...); got {bad[0]!r}")
    try:
        given = OmegaConf.from_dotlist(argv)
        cfg = OmegaConf.merge(OmegaConf.structured(schema), given)
    except OmegaConfBaseException as err:
        raise RunnerError(f"{str(err).splitlines()[0]} (keys: {', '.join(f.name for f in schema.__dataclass_fields__.values())})") from err
    out = OmegaConf.to_object(cfg)
    if not out.model_dir:
        raise RunnerError("model_dir is required: the model/ folder of a run, or runs:/<mlflow run id>")
    if getattr(out, "batch_size", None) is not None and out.batch_size < 1:
        raise RunnerError(f"batch_size={out.batch_size} must be at least 1")
    return out


def check_writable(path: str | Path, kind: str, key: str) -> None:
    """``path`` (a file or folder to be written) can be written: checked before any work, not after it."""
    import os

    path = Path(path)
    if path.exists() and (path.is_dir() != (kind == "folder")):
        raise RunnerError(f"{key}={path} is {'a folder' if path.is_dir() else 'a file'}: give a {kind} path")
    if path.is_file() and os.access(path, os.W_OK):  # an earlier output, replaced
        return
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise RunnerError(f"{key}={path}: cannot write there ({parent} is {'not writable' if parent.is_dir() else 'a file'}"
                          f"): choose a writable place")


def resolve_model_dir(model_dir: str, tracking_uri: str | None) -> Path:
    """A folder, ``runs:/<id>`` or ``models:/<registered name>/<version or latest>``: the run's own model folder
    when it is on this machine, else its artifact."""
    if not model_dir.startswith(("runs:/", "models:/")):
        return Path(model_dir)
    import mlflow

    from runner.tracking import default_uri

    uri = tracking_uri or default_uri()
    if model_dir.startswith("models:/"):
        return resolve_model_dir(f"runs:/{registered_run(model_dir, uri)}", uri)
    run_id = model_dir[len("runs:/") :].strip("/").split("/")[0]
    try:
        run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as err:
        raise RunnerError(f"model_dir={model_dir}: no such MLflow run in {uri} (set tracking_uri)") from err
    local = Path(run.data.tags.get("output_dir", "")) / "model"
    if (local / "runner_model.json").exists():
        return local
    # elsewhere: the runner folder inside the run's pyfunc model (runner/mlflow_model.py)
    return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model/artifacts/runner_model", tracking_uri=uri))


def registered_run(model_dir: str, uri: str) -> str:
    """The run id behind ``models:/<name>/<version>`` (``latest``: the highest version)."""
    import mlflow

    parts = model_dir[len("models:/"):].strip("/").split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise RunnerError(f"model_dir={model_dir}: write models:/<registered name>/<version or latest>")
    name, version = parts
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        versions = client.search_model_versions(f"name='{name}'") if version == "latest" else \
            [client.get_model_version(name, version)]
    except Exception as err:  # noqa: BLE001  (MlflowException, or a bad version string)
        raise RunnerError(f"model_dir={model_dir}: no such registered model version in {uri} ({str(err)[:120]})") from err
    if not versions:
        raise RunnerError(f"model_dir={model_dir}: no registered model {name!r} in {uri} (tracking.register=NAME registers one)")
    return max(versions, key=lambda v: int(v.version)).run_id


def read_inputs(folder: Path, meta: dict, cfg: PredictConfig) -> tuple[list[list[str]] | np.ndarray, dict | None]:
    """The text columns of the input (one, or two for pair models), or its vectors (given-embedding models), and
    where each row came from ({"file": [...]} for a folder of files, {"line": [...]} for a lines file; None
    otherwise)."""
    from runner.data import read_source, read_vectors, reading_config, select, text_fields
    from runner.schema import DataType
    from runner.sources import ORIGIN_COLUMNS

    pair = meta.get("data_type") == "pair"
    if cfg.text is not None:
        if cfg.input is not None:
            raise RunnerError("give input=FILE or text=..., not both")
        if pair and cfg.text_pair is None:
            raise RunnerError("this model scores pairs of texts: give text=... and text_pair=...")
        if not pair and cfg.text_pair is not None:
            raise RunnerError("text_pair= is for pair models; this model takes one text per input")
        if meta.get("input") == "embeddings":
            raise RunnerError("this model takes vectors (given embeddings), not text: give input=FILE")
        return ([[cfg.text], [cfg.text_pair]] if pair else [[cfg.text]]), None
    if cfg.input is None:
        raise RunnerError("give input=FILE (csv, tsv, jsonl, parquet) or text=...")
    data = reading_config(folder, meta, cfg.input, cfg.data)
    if meta.get("data_type") == "triplet":  # an embedding model: one text per row
        data.type = DataType.single
    frame, where = read_source(data, "train")
    if meta.get("input") == "embeddings":
        raw = [data.embedding_field] if data.embedding_field else []
        if not raw:
            raise RunnerError("this model takes vectors: set data.embedding_field to the input's vector column")
        return read_vectors(data, select(data, frame, where, [], None, raw), "train"), None
    fields = text_fields(data)
    selected = select(data, frame, where, fields, None, [])  # a frame, or texts left on disk (runner.streaming)
    origins = {c: frame[c] for c in ORIGIN_COLUMNS if c in frame.columns and c not in fields}
    origins = {c: v.tolist() if hasattr(v, "tolist") else v.to_pylist() for c, v in origins.items()}
    return [selected[f"text{i}"].tolist() for i in range(len(fields))], origins or None


BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


def choose_backend(folder: Path, backend: str) -> tuple[str, str, dict | None]:
    """The backend to run, why (logged), and the graph's export record (onnx/runner_model.json's ``onnx``) when it
    is a graph: ``auto`` is the exported fp32 graph when the folder holds one made from these very weights and
    onnxruntime is installed, else PyTorch. An explicit onnx backend whose graph was exported from other weights
    is an error (its outputs would belong to another model)."""
    from runner import trust
    from runner.onnx_model import source_digest

    if backend not in BACKENDS:
        raise RunnerError(f"backend={backend!r}: choose auto, torch, onnx or onnx-int8 (after runner.export)")
    if backend == "torch":
        return "torch", "asked for", None
    graph = folder / "onnx" / ("model.int8.onnx" if backend == "onnx-int8" else "model.onnx")
    if not graph.exists():
        if backend == "auto":
            return "torch", (f"no exported graph (python -m runner.export model_dir={folder} format=onnx, or train with "
                             f"export_onnx=true, gives the faster ONNX Runtime path)"), None
        raise RunnerError(f"{graph} does not exist: run python -m runner.export model_dir={folder} format=onnx"
                          f"{' quantize=int8' if backend == 'onnx-int8' else ''} first")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        if backend == "auto":
            return "torch", "onnxruntime is not installed (pip install onnxruntime for the faster path)", None
        raise RunnerError(f"backend={backend} needs onnxruntime: pip install onnxruntime") from err
    record = trust.read_json(folder / "onnx" / "runner_model.json").get("onnx")
    record = record if isinstance(record, dict) else {}
    recorded = record.get("source") if isinstance(record.get("source"), str) else None
    if recorded != source_digest(folder):
        why = ("was exported from other weights than this folder's" if recorded else "records no digest of the weights "
               "it was exported from (an older export)")
        if backend == "auto":
            return "torch", f"{graph} {why}: export again for the faster path", None
        raise RunnerError(f"{graph} {why}: export again with python -m runner.export model_dir={folder} format=onnx")
    return ("onnx" if backend == "auto" else backend), f"{graph.name} exported from these weights", record


class Predictor:
    """A saved model and what it outputs for raw inputs: one tokenization and batching path with training."""

    def __init__(self, folder: Path, backend: str = "auto", precision: str = "auto") -> None:
        from runner.artifact import load_model
        from runner.model import quiet_libraries
        from runner.onnx_model import available_cpus

        quiet_libraries()
        if precision not in ("auto", "fp32", "bf16"):
            raise RunnerError(f"precision={precision!r}: choose auto (the training run's), fp32 or bf16")
        asked = backend
        backend, why, record = choose_backend(folder, backend)
        if backend.startswith("onnx") and precision == "bf16":
            raise RunnerError("precision=bf16 runs on backend=torch; the ONNX graphs are fp32 (or int8)")
        self.folder, self.backend, self.onnx = folder, backend, None
        threads = available_cpus()
        if backend.startswith("onnx"):  # the exported graph and its tokenizer: no PyTorch model is built
            from transformers import AutoTokenizer

            from runner.artifact import read_meta
            from runner.onnx_model import OnnxModel

            self.onnx = OnnxModel(folder, "model.int8.onnx" if backend == "onnx-int8" else "model.onnx", threads)
            # the folder's own metadata (the digest binds the graph to it), with the graph's export record
            self.meta = {**read_meta(folder), "onnx": record}
            self.tokenizer = AutoTokenizer.from_pretrained(folder / "onnx", trust_remote_code=False)
            self.model = None
        else:
            self.model, self.tokenizer, self.meta = load_model(folder)
            if torch.get_num_threads() > threads:  # a container's CPU quota: more threads than CPUs only contend
                torch.set_num_threads(threads)
        # auto: the precision training evaluated in (bf16 autocast where precision=auto chose it), so that
        # predictions reproduce the logged metrics; fp32 for full precision. ONNX graphs are fp32.
        trained = self.meta.get("precision", "fp32")
        # this predictor runs on the CPU: fp16 (a GPU training's autocast) has no CPU counterpart, fp32 is closest
        self.precision = (trained if trained == "bf16" else "fp32") if precision == "auto" else precision
        if self.onnx is not None:
            self.precision = "int8" if backend == "onnx-int8" else "fp32"
        log.info("backend=%s%s: %s (%s, %d threads)", backend, " (auto)" if asked == "auto" else "", why, self.precision,
                 threads)
        if backend == "onnx-int8":
            cost = (self.meta.get("onnx") or {}).get("int8_check")
            log.info("int8 accuracy cost: %s", cost_line(cost) if cost else
                     "not measured (runner.export ... quantize=int8 check=FILE, or runner.evaluate backend=onnx-int8)")

    @property
    def has_head(self) -> bool:
        return self.meta["head"] is not None

    @torch.inference_mode()
    def run(self, inputs, batch_size: int = 64, progress: bool = False, embeddings: bool = False,
            max_tokens: int | None = None) -> dict:
        """``head``: head outputs (rows, outputs) of a head model; ``columns``: the pooled vector of every text
        column (embedding models, or with ``embeddings``); all in input order; ``text_ids``: equal for equal
        texts (the ids training's evaluation uses), None for vectors."""
        from tqdm.auto import tqdm

        from runner import batching

        if isinstance(inputs, np.ndarray):  # given embeddings: the head on the vectors
            vectors = {"frozen": torch.from_numpy(inputs)}
            return {"head": self.model(vectors).numpy(), "columns": [self.model.embed(vectors).numpy()] if embeddings else [],
                    "text_ids": None}
        data = batching.Encoded(self.tokenizer, inputs, None, self.meta["max_length"], self.meta.get("text_prefix", ""),
                                joint=bool(self.meta.get("joint")))
        loader = batching.make_loader(data, self.tokenizer, batch_size, train=False, max_tokens=max_tokens)
        want_columns = embeddings or not self.has_head
        head, columns, index = [], [[] for _ in data.input_ids], []
        for batch in tqdm(loader, disable=not progress, unit="batch", desc="predict"):
            out, pooled = self.forward(batch["features"], want_columns)
            head.append(out)
            for store, vectors in zip(columns, pooled):
                store.append(vectors)
            index.append(batch["index"])
        order = torch.cat(index).argsort()  # one gather at the end: no host round trip per batch
        gather = lambda parts: torch.cat(parts)[order].float().numpy()  # noqa: E731
        return {"head": gather(head) if self.has_head else None,
                "columns": [gather(c) for c in columns] if want_columns else [], "text_ids": data.text_ids.numpy()}

    def forward(self, features: list[dict], want_columns: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Head outputs (None without a head) and, if wanted, the pooled vector of each text column."""
        if self.onnx is not None:
            return self.onnx.forward(features, want_columns)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.torch_forward(features, want_columns)

    def torch_forward(self, features: list[dict], want_columns: bool):
        first = self.model.embed(features[0])
        head = self.model.head(first) if self.has_head else None
        pooled = [first, *(self.model.embed(f) for f in features[1:])] if want_columns else []
        return head, pooled

    def records(self, outputs: dict, top_k: int | None = None) -> list[dict[str, Any]]:
        """One JSON-ready dict per row."""
        meta, head, columns = self.meta, outputs["head"], outputs["columns"]
        check_finite_outputs([a for a in (head, *columns) if a is not None])
        rows: list[dict[str, Any]] = [{} for _ in range(len(head) if head is not None else len(columns[0]))]
        task, labels = meta.get("task"), meta.get("labels") or []
        if task == "MultiLabel":
            probs = 1 / (1 + np.exp(-head))
            for row, p in zip(rows, probs):
                row["labels"] = [labels[i] for i in np.flatnonzero(p > meta.get("threshold", 0.5))]
                row["probabilities"] = {str(labels[i]): round(float(p[i]), 6) for i in np.argsort(-p)[:top_k]}
        elif task == "Regress":
            low, high = meta.get("score_range") or (0.0, 1.0)  # trained on scores scaled to [0, 1]
            for row, s in zip(rows, head[:, 0]):
                row["score"] = float(s * (high - low) + low)
        elif head is not None:
            probs = np.exp(head - head.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            for row, p in zip(rows, probs):
                row["label"] = labels[int(p.argmax())]
                row["probabilities"] = {str(labels[i]): round(float(p[i]), 6) for i in np.argsort(-p)[:top_k]}
        elif len(columns) == 2:  # a bi-encoder scores a pair by the similarity of its two vectors
            from runner.losses import paired_similarity

            sims = paired_similarity(torch.from_numpy(columns[0]), torch.from_numpy(columns[1]),
                                     meta.get("similarity", "cosine")).numpy()
            for row, s in zip(rows, sims):
                row["similarity"] = float(s)
        for name, vectors in zip(("embedding", "embedding_pair"), columns):
            for row, vector in zip(rows, vectors):
                row[name] = vector.tolist()
        return rows


def cost_line(cost) -> str:
    """What int8 quantization costs, as export measured it on a labelled file (read from a folder a user may have
    been handed: anything but the numbers export writes is refused)."""
    def numbers(part) -> bool:
        return isinstance(part, dict) and all(isinstance(k, str) and type(v) in (int, float) for k, v in part.items())

    if not (isinstance(cost, dict) and isinstance(cost.get("file"), str) and numbers(cost.get("fp32"))
            and numbers(cost.get("int8")) and set(cost["fp32"]) == set(cost["int8"]) and cost["fp32"]):
        raise RunnerError("onnx/runner_model.json: its int8_check is not what runner.export writes: export again with "
                          "python -m runner.export ... format=onnx quantize=int8 check=FILE")
    headline = [k for k in cost["fp32"] if k.rsplit("/", 1)[-1] in ("accuracy", "f1_macro", "spearman", "mean_recall")]
    return ", ".join(f"{k} {cost['fp32'][k]:.4f} (fp32) -> {cost['int8'][k]:.4f} (int8)"
                     for k in headline or list(cost["fp32"])[:2]) + f" on {cost['file']}"


def predict(cfg: PredictConfig) -> list[dict[str, Any]]:
    folder = resolve_model_dir(cfg.model_dir, cfg.tracking_uri)
    from runner.artifact import read_meta

    meta = read_meta(folder)
    if cfg.output:
        check_writable(cfg.output, "file", "output")
    if meta.get("kind") == "dual":
        from runner import dual_inference

        if cfg.backend not in ("auto", "torch"):
            raise RunnerError(f"backend={cfg.backend}: a dual encoder predicts with backend=torch")
        return dual_inference.predict(cfg, folder, meta)
    if cfg.classes or cfg.prompt:
        raise RunnerError("classes= and prompt= are for dual image-text encoders")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise RunnerError(f"top_k={cfg.top_k} must be at least 1")
    if cfg.output:
        check_writable(cfg.output, "file", "output")
    inputs, origins = read_inputs(folder, meta, cfg)
    predictor = Predictor(folder, cfg.backend, cfg.precision)
    outputs = predictor.run(inputs, cfg.batch_size, cfg.progress and cfg.text is None, cfg.embeddings)
    rows = predictor.records(outputs, cfg.top_k)
    for column, values in (origins or {}).items():  # which file (folder) or line (lines file) a row is for
        rows = [{column: value, **row} for value, row in zip(values, rows)]
    return rows


def write_jsonl(rows: list[dict], output: str | None) -> None:
    import orjson  # ten times json's speed on embedding rows (10,000 x 384 floats: 0.2 s instead of 2 s)

    lines = b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows)
    if output is None:
        sys.stdout.buffer.write(lines)
        sys.stdout.flush()
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_bytes(lines)
    log.info("%d predictions written to %s", len(rows), output)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        write_jsonl(predict(cfg), cfg.output)
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)  # one line, whatever the logging setup
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
