"""The saved model folder: self-describing, loadable without the training config.

    model/
      runner_model.json   format version, base model, pooling, head shape, label map, tokenization
      encoder/            full / head_only: the encoder in Hugging Face format
      adapter/            peft: the LoRA adapter in PEFT format (base model referenced in the json)
      base/               peft on a randomly initialised base (model=tiny): the base weights too
      tokenizer/          the tokenizer, Hugging Face format
      head.safetensors    head and pooling weights
      config.yaml         the composed run config (for the record; loading never reads it)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import get_class
from safetensors.torch import load_file, save_file

from runner.model import TextModel

FORMAT_VERSION = 1


def save_model(folder: str | Path, model: TextModel, tokenizer, label_names: list, base_model: str | None,
               text_prefix: str, max_length: int, config_yaml: str | None = None) -> Path:
    from peft import PeftModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    is_peft = isinstance(model.encoder, PeftModel)
    if is_peft:
        model.encoder.save_pretrained(folder / "adapter")
        if base_model is None:
            model.encoder.get_base_model().save_pretrained(folder / "base")
    else:
        model.encoder.save_pretrained(folder / "encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    head = {f"head.{k}": v.contiguous() for k, v in model.head.state_dict().items()}
    head.update({f"pooling.{k}": v.contiguous() for k, v in model.pooling.state_dict().items()})
    save_file(head, folder / "head.safetensors")
    linear = model.head[-1]
    meta = {
        "format_version": FORMAT_VERSION,
        "encoder": "adapter" if is_peft else "encoder",
        "base_model": base_model if is_peft and base_model else ("base" if is_peft else None),
        "pooling": model.pooling.describe(),
        "head": {"type": "linear", "in_features": linear.in_features, "out_features": linear.out_features},
        "labels": label_names,
        "text_prefix": text_prefix,
        "max_length": max_length,
        "padding_side": tokenizer.padding_side,
    }
    (folder / "runner_model.json").write_text(json.dumps(meta, indent=2))
    if config_yaml is not None:
        (folder / "config.yaml").write_text(config_yaml)
    return folder


def load_model(folder: str | Path) -> tuple[TextModel, object, dict]:
    """Rebuild a saved model for inference: (model in eval mode, tokenizer, metadata)."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    meta = json.loads((folder / "runner_model.json").read_text())
    if meta["encoder"] == "adapter":
        from peft import PeftModel

        base_ref = meta["base_model"]
        base = AutoModel.from_pretrained(folder / "base" if base_ref == "base" else base_ref)
        encoder = PeftModel.from_pretrained(base, folder / "adapter")
    else:
        encoder = AutoModel.from_pretrained(folder / "encoder")
    pooling_spec = dict(meta["pooling"])
    pooling = get_class(pooling_spec.pop("_target_"))(**pooling_spec)
    model = TextModel(encoder, pooling, meta["head"]["out_features"])
    weights = load_file(folder / "head.safetensors")
    model.head.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})
    model.pooling.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("pooling.")})
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    return model.eval(), tokenizer, meta


@torch.no_grad()
def predict_labels(model: TextModel, tokenizer, meta: dict, texts: list[str], batch_size: int = 64) -> list:
    """Original label values (from the saved label map) for raw texts."""
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = [meta["text_prefix"] + t for t in texts[i : i + batch_size]]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=meta["max_length"], return_tensors="pt")
        out += model(batch).argmax(-1).tolist()
    return [meta["labels"][i] for i in out]
