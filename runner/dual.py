"""Dual encoders: an image tower and a text tower mapping into one embedding space (CLIP, SigLIP, LiT).

The model is transformers' own class (``CLIPModel``, ``SiglipModel``, ``VisionTextDualEncoderModel``), chosen by
the config's ``model_type`` from an explicit table, so a saved folder loads with that class and computes what the
runner computed. :class:`DualModel` gives the runner's model interface: ``model(features)`` is the image
embedding for a batch of ``pixel_values`` and the text embedding for token ids (a batch is a mapping of named
inputs), and ``logit_scale`` / ``logit_bias`` are the learnable temperature and bias the loss uses.

LiT (``model=lit``): a pretrained text encoder (``model.name_or_path``) and a vision tower built from
``model.vision_init`` (a transformers vision config), joined by ``VisionTextDualEncoderModel`` with its two
projections; ``model.locked=[text]`` keeps the text tower as loaded while the vision tower learns to match it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from runner.errors import RunnerError
from runner.modes import Full, HeadOnly, Lora
from runner.schema import ModelConfig

log = logging.getLogger("runner")
TOWERS = {"text": "text_model", "vision": "vision_model"}  # the projections and the temperature always train
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_classes() -> dict:
    """config ``model_type`` -> the transformers class that loads it: what a folder's config may name."""
    from transformers import CLIPModel, SiglipModel, VisionTextDualEncoderModel

    return {"clip": CLIPModel, "siglip": SiglipModel, "vision-text-dual-encoder": VisionTextDualEncoderModel}


def is_dual(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` names a dual encoder: a LiT vision tower, a random one, or a folder/hub id whose config says so."""
    if cfg.vision_init:
        return True
    if cfg.random_init:
        return cfg.random_init.get("model_type") in model_classes()
    from runner.model import load_config

    return load_config(cfg, 0).model_type in model_classes()


class DualModel(nn.Module):
    """The runner's view of a transformers dual encoder (see the module docstring)."""

    head_outputs = None  # an embedding model: no head
    frozen_encoder = False

    def __init__(self, encoder: nn.Module, frozen: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.encoder, self.frozen = encoder, tuple(frozen)  # encoder: the transformers model (or peft around it)
        # what the text tower reads (CLIP and SigLIP take no token_type_ids; a BERT text tower in LiT does)
        accepted = inspect.signature(self.tower("text").forward).parameters
        self.text_inputs = tuple(k for k in TEXT_INPUTS if k in accepted)
        for tower in self.frozen:
            self.tower(tower).requires_grad_(False)

    def tower(self, name: str) -> nn.Module:
        return getattr(self.transformers_model, TOWERS[name])

    @property
    def transformers_model(self) -> nn.Module:
        """The transformers model itself (under a LoRA wrapper during training)."""
        from peft import PeftModel

        return self.encoder.base_model.model if isinstance(self.encoder, PeftModel) else self.encoder

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.transformers_model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.transformers_model, "logit_bias", None)

    def train(self, mode: bool = True) -> DualModel:
        super().train(mode)
        for tower in self.frozen:  # a frozen tower gives the same output in training as at inference (no dropout)
            self.tower(tower).eval()
        return self

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        model = self.transformers_model  # LoRA layers sit inside it: calling it directly runs them
        if "pixel_values" in features:
            out = model.get_image_features(pixel_values=features["pixel_values"])
        else:
            out = model.get_text_features(**{k: v for k, v in features.items() if k in self.text_inputs})
        return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5: an output object

    embed = forward


def load_dual(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The transformers dual encoder of ``cfg``: LiT (a text encoder + a vision tower from a config), a random
    one from ``model.random_init``, or the pretrained one of ``model.name_or_path`` (safetensors only)."""
    from transformers import AutoConfig, AutoModel, VisionTextDualEncoderConfig

    classes = model_classes()
    if cfg.vision_init:
        options = dict(cfg.vision_init)
        kind = options.pop("model_type", None)
        if kind not in VISION_TYPES:
            raise RunnerError(f"model.vision_init.model_type={kind!r}: build the vision tower from one of "
                              f"{', '.join(VISION_TYPES)}")
        from runner.model import load_encoder

        text = load_encoder(dataclasses.replace(cfg, vision_init=None), vocab_size)
        if getattr(text, "pooler", None) is not None:  # load_encoder freezes it; here it is the text output
            text.pooler.requires_grad_(True)
        vision = AutoModel.from_config(AutoConfig.for_model(kind, **options))
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision.config, text.config, projection_dim=cfg.projection_dim or text.config.hidden_size)
        return classes["vision-text-dual-encoder"](config=config, vision_model=vision, text_model=text)
    if cfg.random_init:
        config = random_config(cfg)
        return classes[config.model_type](config)
    from runner.model import load_config

    config = load_config(cfg, vocab_size)
    if config.model_type not in classes:
        raise RunnerError(f"model {cfg.name_or_path} is a {config.model_type!r} model, not a dual encoder the runner "
                          f"offers ({', '.join(classes)}): image data needs model=clip, model=siglip or model=lit")
    try:
        return classes[config.model_type].from_pretrained(cfg.name_or_path, revision=cfg.revision, use_safetensors=True)
    except OSError as err:
        raise RunnerError(f"could not load the model '{cfg.name_or_path}': {str(err).splitlines()[0]} (the runner reads "
                          f"safetensors weights only)") from err


VISION_TYPES = ("vit", "clip_vision_model", "siglip_vision_model")


def build(cfg: ModelConfig, mode, vocab_size: int) -> DualModel:
    """A dual encoder to train: the mode applies to the towers of ``mode.towers`` (default both) not in
    ``model.locked``; the others stay as loaded. The projections and the temperature always train."""
    check_mode(mode)
    encoder = load_dual(cfg, vocab_size)
    tuned = tuned_towers(cfg, mode)
    frozen = tuple(t for t in TOWERS if t not in tuned or isinstance(mode, HeadOnly))
    if isinstance(mode, Lora) and tuned:
        encoder = with_lora(encoder, mode, tuned)
    model = DualModel(encoder, frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise RunnerError("nothing of this dual encoder would train (both towers frozen and no projections): use "
                          "mode=full or mode=peft for a tower")
    return model


def tuned_towers(cfg: ModelConfig, mode) -> tuple[str, ...]:
    return tuple(t for t in (mode.towers or TOWERS) if t not in cfg.locked)


def random_config(cfg: ModelConfig):
    """The transformers config of ``model.random_init`` (its model_type and the config's values)."""
    from transformers import AutoConfig

    options = dict(cfg.random_init)
    return AutoConfig.for_model(options.pop("model_type"), **options)


def check(cfg: ModelConfig, vocab_size: int) -> None:
    """What the config alone says is wrong, before any weight loads: texts longer than the text tower's positions
    (an index error mid-run), token ids past its embedding table."""
    from runner.model import load_config

    if cfg.vision_init:
        text = load_config(dataclasses.replace(cfg, vision_init=None), vocab_size)
    elif cfg.random_init:
        text = random_config(cfg).text_config
    else:
        text = load_config(cfg, vocab_size).text_config
    limit = getattr(text, "max_position_embeddings", None)
    if limit and cfg.max_length > limit:
        raise RunnerError(f"model.max_length={cfg.max_length} but this text tower takes at most {limit} tokens: set "
                          f"model.max_length to {limit} or less")
    rows = getattr(text, "vocab_size", None)
    if rows and vocab_size > rows:
        raise RunnerError(f"the tokenizer has {vocab_size:,} tokens but the text tower {rows:,} embedding rows: use the "
                          f"model's own tokenizer (model.tokenizer=null) or one whose vocabulary fits")


def check_mode(mode) -> None:
    """Checked before a run opens, and again when the model is built."""
    if isinstance(mode, Full) and mode.freeze_layers:
        raise RunnerError("mode.freeze_layers applies to text encoders; for a dual encoder freeze a whole tower "
                          "(mode.towers=[vision], or model.locked=[text])")
    if isinstance(mode, Lora) and (mode.quantize or mode.target_modules):
        raise RunnerError("mode.quantize and mode.target_modules apply to text encoders; LoRA on a dual encoder targets "
                          "the attention and MLP layers of the towers in mode.towers")


# The attention and MLP layers of every tower the runner offers (CLIP/SigLIP: q/k/v/out_proj, fc1/fc2; BERT, ViT:
# query/key/value/dense), matched inside the tuned towers only
LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "query", "key", "value", "dense")


def with_lora(encoder: nn.Module, mode, towers: tuple[str, ...]) -> nn.Module:
    """LoRA adapters on the attention and MLP layers of ``towers``; everything else frozen except the projections
    and the temperature (which train as a head does). The saved folder merges them (transformers loads it)."""
    from peft import LoraConfig, get_peft_model

    pattern = rf"^({'|'.join(TOWERS[t] for t in towers)})\..*\.({'|'.join(LORA_LAYERS)})$"
    config = LoraConfig(r=mode.r, lora_alpha=mode.alpha, lora_dropout=mode.dropout, target_modules=pattern, bias="none")
    wrapped = get_peft_model(encoder, config)
    for name, param in wrapped.named_parameters():
        if any(part in name for part in ("projection", "logit_scale", "logit_bias")):
            param.requires_grad_(True)
    return wrapped


# ---- the saved folder ------------------------------------------------------------------------------------------

def save(folder: Path, model: DualModel, tokenizer, processor, meta: dict) -> Path:
    """A folder transformers loads as it is (``CLIPModel.from_pretrained(folder)``, ``AutoProcessor``), plus
    runner_model.json saying how the runner tokenized and what the task was."""
    from runner.images import save_processor
    from runner.modes import merged_encoder

    folder.mkdir(parents=True, exist_ok=True)
    model.encoder = merged_encoder(model.encoder)  # LoRA folded into the weights: transformers' class loads it
    model.encoder.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_processor(processor, folder)
    (folder / "runner_model.json").write_text(json.dumps({**meta, "kind": "dual",
                                                          "model_type": model.encoder.config.model_type}, indent=2))
    return folder


def load_saved(folder: Path, meta: dict):
    """(DualModel in eval mode with its ``image_processor``, tokenizer) of a saved folder: only the classes of
    :func:`model_classes`, safetensors only, no remote code."""
    from transformers import AutoTokenizer

    from runner import trust
    from runner.images import load_processor

    kind = meta.get("model_type")
    classes = model_classes()
    if kind not in classes:
        raise RunnerError(f"{folder}/runner_model.json: model_type={str(kind)[:60]!r} is not a dual encoder the runner "
                          f"offers ({', '.join(classes)})")
    trust.check_weights(folder, "dual encoder")
    config = trust.read_json(folder / "config.json")
    if not isinstance(config, dict) or config.get("model_type") != kind:
        said = config.get("model_type") if isinstance(config, dict) else None
        raise RunnerError(f"{folder}: config.json says {str(said)[:60]}, runner_model.json {kind}")
    encoder = classes[kind].from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = DualModel(encoder).eval()
    model.image_processor = load_processor(str(folder), None)
    model.head = saved_head(folder, meta) if meta.get("head") else None
    return model, tokenizer


def saved_head(folder: Path, meta: dict) -> nn.Module:
    """A linear probe's classifier (head.safetensors), checked like any saved head."""
    from safetensors.torch import load_file

    from runner import trust

    spec = meta["head"]
    head = nn.Linear(spec["in_features"], spec["out_features"])
    if len(meta.get("labels") or []) != spec["out_features"]:
        raise RunnerError(f"{folder}/runner_model.json: {len(meta.get('labels') or [])} labels for a head of "
                          f"{spec['out_features']} outputs")
    path = folder / "head.safetensors"
    trust.check_safetensors(path)
    weights = load_file(path)
    trust.check_tensors(weights, {f"head.1.{k}": v for k, v in head.state_dict().items()}, path)
    head.load_state_dict({k[len("head.1."):]: v for k, v in weights.items()})
    return head.eval()


def embed_images(model: DualModel, processor, images: list, batch_size: int, device) -> torch.Tensor:
    """Image embeddings (float32, on the CPU) of paths or image files' bytes, ``batch_size`` at a time."""
    from runner.images import pixel_values

    out = []
    for i in range(0, len(images), batch_size):
        out.append(model({"pixel_values": pixel_values(processor, images[i:i + batch_size]).to(device)}).float().cpu())
    return torch.cat(out)


def text_features(tokenizer, texts: list[str], max_length: int, padding: str, prefix: str = "") -> dict:
    """Token ids of texts as the dual encoder is fed them (``model.text_padding``: SigLIP pads to max_length)."""
    encoded = tokenizer([prefix + t for t in texts], padding=padding, truncation=True, max_length=max_length,
                        return_tensors="pt")
    return {k: v for k, v in encoded.items() if k in TEXT_INPUTS}


def describe(model: DualModel) -> str:
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    locked = f", frozen: {', '.join(model.frozen)}" if model.frozen else ""
    return f"{model.encoder.config.model_type} dual encoder, {trained:,} of {total:,} weights train{locked}"

