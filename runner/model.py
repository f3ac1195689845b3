"""Encoder + pooling + head, and loading encoders and tokenizers from config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from runner.errors import RunnerError
from runner.pooling import Pooling
from runner.schema import ModelConfig
from runner.trust import check_weights


def quiet_libraries() -> None:
    """No per-file progress bars from transformers, no INFO notes or style advice from MLflow: the run's own
    bar and log lines are the output, and a successful run ends on its metrics (new users read any library
    warning after them as a problem)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # and if it already was


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``cfg.tokenizer`` (default: ``cfg.name_or_path``), with a pad token ensured."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if not source:
        raise RunnerError("model.name_or_path (or model.tokenizer) must name a local folder or a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except OSError as err:
        raise RunnerError(f"could not load the tokenizer '{source}': {first_line(err)}") from err
    real = len(tokenizer) - len(set(tokenizer.all_special_ids))
    if real <= 0:  # transformers builds an empty tokenizer for a folder without tokenizer files
        raise RunnerError(f"the tokenizer of '{source}' has no vocabulary (only {len(tokenizer)} special tokens): the "
                          f"folder lacks tokenizer files; set model.tokenizer to a folder or hub id that has them")
    if tokenizer.pad_token is None:  # decoder tokenizers (Qwen, Llama) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.padding_side:
        tokenizer.padding_side = cfg.padding_side.value
    return tokenizer


def load_config(cfg: ModelConfig, vocab_size: int):
    """The encoder's transformers config: from ``cfg.name_or_path``, or built from ``cfg.random_init``."""
    from transformers import AutoConfig

    if cfg.random_init:
        options = dict(cfg.random_init)
        if "model_type" not in options:
            raise RunnerError("model.random_init needs a model_type (e.g. bert) besides the config values")
        try:
            return AutoConfig.for_model(options.pop("model_type"), vocab_size=vocab_size, **options)
        except (ValueError, TypeError) as err:
            raise RunnerError(f"model.random_init: {first_line(err)}") from err
    name = cfg.name_or_path
    if not name:
        raise RunnerError("model.name_or_path must name a local folder or a hub id (or set model.random_init)")
    if looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise RunnerError(f"model.name_or_path={name}: no such folder (relative paths start from {os.getcwd()})")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as err:
        where = "" if looks_like_path(name) else f" (no folder {os.path.abspath(name)} here, so it was taken as a Hub id)"
        raise RunnerError(f"could not load the model '{name}'{where}: {first_line(err)}") from err


def looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else with a slash, or starting with . or ~, is a path."""
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or os.path.exists(name)


def position_limit(config) -> int | None:
    """The longest input the encoder's position embeddings allow (RoBERTa-style models offset by pad + 1)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and config.model_type in OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    return limit


OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet"}


def check_layers(layers, available: int) -> None:
    if any(not -available <= i < available for i in layers):
        raise RunnerError(
            f"pooling.layers={list(layers)} but this encoder has {available} hidden states "
            f"(embeddings + {available - 1} layers): use indices from {-available} to {available - 1}"
        )


def check_model(cfg: ModelConfig, vocab_size: int, mode, layers) -> None:
    """Everything about the model that can be wrong, checked on its config and a weightless skeleton
    before any run opens: the path, max_length against the positions, pooling layers, the mode's targets."""
    from transformers import AutoModel

    config = load_config(cfg, vocab_size)
    limit = position_limit(config)
    if limit and cfg.max_length > limit:
        raise RunnerError(f"model.max_length={cfg.max_length} but this encoder takes at most {limit} tokens: "
                          f"set model.max_length to {limit} or less")
    check_layers(layers, config.num_hidden_layers + 1)
    rows = getattr(config, "vocab_size", None)
    if not cfg.random_init and rows and vocab_size > rows:  # ids past the table: an IndexError mid-run
        raise RunnerError(f"the tokenizer of '{cfg.tokenizer or cfg.name_or_path}' has {vocab_size:,} tokens but the "
                          f"encoder '{cfg.name_or_path}' has {rows:,} embedding rows: use the model's own tokenizer "
                          f"(model.tokenizer=null) or one whose vocabulary fits")
    if not cfg.random_init and os.path.isdir(os.path.expanduser(cfg.name_or_path)):
        check_weights(Path(os.path.expanduser(cfg.name_or_path)), "model")
    with torch.device("meta"):  # module names and shapes only: no memory, no weights read
        skeleton = AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code)
    mode.check(skeleton)


def load_encoder(cfg: ModelConfig, vocab_size: int, options: dict | None = None) -> nn.Module:
    """The pretrained encoder of ``cfg.name_or_path``, or a random one built from ``cfg.random_init``;
    ``options``: more ``from_pretrained`` arguments (a mode's 4-bit quantization)."""
    from transformers import AutoModel

    if cfg.random_init and options:
        raise RunnerError(f"{', '.join(options)} needs pretrained weights to quantize; model.random_init builds a "
                          f"random model: use mode=peft, or a model with weights")
    if cfg.random_init:
        encoder = AutoModel.from_config(load_config(cfg, vocab_size))
    elif not cfg.name_or_path:
        raise RunnerError("model.name_or_path must name a local folder or a hub id (or set model.random_init)")
    else:
        try:
            encoder = AutoModel.from_pretrained(  # safetensors only: pickled weights can run code when loaded
                cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, use_safetensors=True,
                **(options or {})
            )
        except OSError as err:
            raise RunnerError(f"could not load the model '{cfg.name_or_path}': {first_line(err)} (the runner reads "
                              f"safetensors weights only)") from err
    # BERT-style built-in poolers (dense + tanh on [CLS]) are unused: our pooling replaces them. Frozen,
    # they get no optimizer state and DDP does not wait for gradients that never come.
    if isinstance(getattr(encoder, "pooler", None), nn.Module):
        encoder.pooler.requires_grad_(False)
    return encoder


def weights_hash(module: nn.Module) -> str:
    """sha256 of every weight by name: what identifies an encoder's numbers, whatever its files look like."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


class TextModel(nn.Module):
    """An encoder, a pooling and a linear head: ``embed`` gives sentence vectors, ``forward`` logits.

    With a frozen encoder (head_only) the encoder runs in eval mode under ``no_grad``: no dropout
    noise in its features and no activations kept for backward, which is what makes head_only fast.
    """

    def __init__(
        self, encoder: nn.Module, pooling: Pooling, num_outputs: int | None, dropout: float = 0.1,
        frozen_encoder: bool = False,
    ) -> None:
        super().__init__()
        check_layers(pooling.layers, encoder.config.num_hidden_layers + 1)  # embeddings, then each layer
        self.encoder = encoder
        self.pooling = pooling
        self.frozen_encoder = frozen_encoder
        self.head_outputs = num_outputs
        hidden = encoder.config.hidden_size
        # no head: an embedding model (bi-encoder pairs, triplets), whose output is the pooled vector
        self.head = nn.Identity() if num_outputs is None else nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_outputs))

    def train(self, mode: bool = True) -> TextModel:
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()
        return self

    def embed(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pooled sentence vectors of one tokenized text column (input_ids, attention_mask, ...), or of
        a frozen encoder's output computed once per text (``frozen``: runner.features)."""
        if "pooled" in features:  # a parameter-free pooling, applied once per text (runner.features)
            return features["pooled"]
        if "frozen" in features:
            return self.pooling.from_frozen(features["frozen"])
        inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            out = self.encoder(**inputs, output_hidden_states=self.pooling.needs_all_layers, return_dict=True)
        hidden = out.hidden_states if self.pooling.needs_all_layers else (out.last_hidden_state,)
        return self.pooling(hidden, features["attention_mask"])

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (or a score) with a head; the sentence embedding without one."""
        return self.head(self.embed(features))


class VectorModel(nn.Module):
    """A head on embeddings computed elsewhere (``data.embedding_field`` / ``data.train_embeddings``):
    batches carry the vectors as ``frozen``, as a frozen encoder's kept output would be."""

    def __init__(self, dim: int, num_outputs: int, dropout: float = 0.1, normalize: bool = False) -> None:
        super().__init__()
        self.dim, self.normalize, self.head_outputs = dim, normalize, num_outputs
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_outputs))

    def embed(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        vectors = features["frozen"]
        return nn.functional.normalize(vectors, p=2, dim=-1) if self.normalize else vectors

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.embed(features))
