"""Encoder + pooling + head, and loading encoders and tokenizers from config."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from runner.errors import RunnerError
from runner.pooling import Pooling
from runner.schema import ModelConfig


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
    if tokenizer.pad_token is None:  # decoder tokenizers (Qwen, Llama) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.padding_side:
        tokenizer.padding_side = cfg.padding_side
    return tokenizer


def load_encoder(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The pretrained encoder of ``cfg.name_or_path``, or a random one built from ``cfg.random_init``."""
    from transformers import AutoConfig, AutoModel

    if cfg.random_init:
        options = dict(cfg.random_init)
        config = AutoConfig.for_model(options.pop("model_type"), vocab_size=vocab_size, **options)
        encoder = AutoModel.from_config(config)
    elif not cfg.name_or_path:
        raise RunnerError("model.name_or_path must name a local folder or a hub id (or set model.random_init)")
    else:
        try:
            encoder = AutoModel.from_pretrained(
                cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
            )
        except OSError as err:
            raise RunnerError(f"could not load the model '{cfg.name_or_path}': {first_line(err)}") from err
    # BERT-style built-in poolers (dense + tanh on [CLS]) are unused: our pooling replaces them. Frozen,
    # they get no optimizer state and DDP does not wait for gradients that never come.
    if isinstance(getattr(encoder, "pooler", None), nn.Module):
        encoder.pooler.requires_grad_(False)
    return encoder


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
        available = encoder.config.num_hidden_layers + 1  # hidden states: embeddings, then each layer
        if any(not -available <= i < available for i in pooling.layers):
            raise RunnerError(
                f"pooling.layers={pooling.layers} but this encoder has {available} hidden states "
                f"(embeddings + {available - 1} layers): use indices from {-available} to {available - 1}"
            )
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
        """Pooled sentence vectors of one tokenized text column (input_ids, attention_mask, ...)."""
        inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            out = self.encoder(**inputs, output_hidden_states=self.pooling.needs_all_layers, return_dict=True)
        hidden = out.hidden_states if self.pooling.needs_all_layers else (out.last_hidden_state,)
        return self.pooling(hidden, features["attention_mask"])

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (or a score) with a head; the sentence embedding without one."""
        return self.head(self.embed(features))
