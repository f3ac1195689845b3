"""Training modes: which encoder weights learn. Chosen by ``_target_`` in ``conf/mode/``.

A mode receives the freshly loaded encoder and returns the module to train (the same encoder with
some weights frozen, or a peft wrapper around it). The head and pooling always train.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from runner.errors import RunnerError

# LoRA targets per architecture family (transformers ``model_type``). Every linear layer of attention
# and MLP: on small encoders this is what gets LoRA close to full fine-tuning.
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],  # BERT, MiniLM, e5, BGE
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "camembert": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "mpnet": ["q", "k", "v", "o", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "modernbert": ["Wqkv", "Wo", "Wi"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class Mode:
    """Base class. ``frozen_encoder`` tells the model it may run the encoder without gradients. ``towers``: for a
    dual encoder (runner/dual.py), the towers the mode applies to (the others stay as loaded); None: every one."""

    frozen_encoder = False
    towers: tuple[str, ...] | None = None

    def set_towers(self, towers: Sequence[str] | None) -> None:
        unknown = sorted(set(towers or ()) - {"text", "vision"})
        if unknown or (towers is not None and not towers):
            raise RunnerError(f"mode.towers={list(towers or [])}: name text and/or vision (null: both)")
        self.towers = tuple(towers) if towers is not None else None

    def check(self, encoder: nn.Module) -> None:
        """Raise a RunnerError if this mode cannot be applied to ``encoder`` (a weightless skeleton)."""

    def apply(self, encoder: nn.Module) -> nn.Module:
        raise NotImplementedError

    def check_device(self, device: str) -> None:
        """Raise a RunnerError if this mode cannot run on ``device`` (``cpu`` or ``cuda``)."""

    def load_options(self) -> dict:
        """Extra ``from_pretrained`` arguments for the encoder this mode trains (4-bit weights for QLoRA)."""
        return {}


class HeadOnly(Mode):
    """Freeze the whole encoder: its weights are bit-identical after training."""

    frozen_encoder = True

    def __init__(self, towers: Sequence[str] | None = None) -> None:
        self.set_towers(towers)

    def apply(self, encoder: nn.Module) -> nn.Module:
        encoder.requires_grad_(False)
        return encoder


class Full(Mode):
    """Train every encoder weight, except the embeddings and bottom ``freeze_layers`` layers if set."""

    def __init__(self, freeze_layers: int = 0, towers: Sequence[str] | None = None) -> None:
        if freeze_layers < 0:
            raise RunnerError(f"mode.freeze_layers={freeze_layers} must be 0 or more")
        self.freeze_layers = freeze_layers
        self.set_towers(towers)

    def check(self, encoder: nn.Module) -> None:
        if self.freeze_layers > 0 and self.freeze_layers > len(transformer_blocks(encoder)):
            raise RunnerError(f"mode.freeze_layers={self.freeze_layers} but the encoder has "
                              f"{len(transformer_blocks(encoder))} layers")

    def apply(self, encoder: nn.Module) -> nn.Module:
        if self.freeze_layers > 0:
            blocks = transformer_blocks(encoder)
            if self.freeze_layers > len(blocks):
                raise RunnerError(
                    f"mode.freeze_layers={self.freeze_layers} but the encoder has {len(blocks)} layers"
                )
            encoder.get_input_embeddings().requires_grad_(False)
            embeddings = getattr(encoder, "embeddings", None)
            if isinstance(embeddings, nn.Module):  # position / token-type embeddings and their LayerNorm
                embeddings.requires_grad_(False)
            for block in blocks[: self.freeze_layers]:
                block.requires_grad_(False)
        return encoder


def merged_encoder(encoder: nn.Module) -> nn.Module:
    """A LoRA encoder with its adapters folded into the weights (a plain transformers model); others as they are."""
    from peft import PeftModel

    return encoder.merge_and_unload() if isinstance(encoder, PeftModel) else encoder


class Lora(Mode):
    """LoRA adapters through peft; only the adapters (and the head) train. ``merge``: the saved model is
    the encoder with the adapters merged in (a plain Hugging Face folder, no peft needed to load it)."""

    def __init__(
        self, r: int = 8, alpha: int = 16, dropout: float = 0.1, target_modules: Sequence[str] | None = None,
        merge: bool = False, quantize: str | None = None, compute_dtype: str = "bfloat16",
        towers: Sequence[str] | None = None,
    ) -> None:
        self.set_towers(towers)
        if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
            raise RunnerError(f"mode: r={r} must be at least 1, alpha={alpha} positive, dropout={dropout} in [0, 1)")
        if quantize not in (None, "nf4", "fp4"):
            raise RunnerError(f"mode.quantize={quantize!r}: use nf4 or fp4 (4-bit base weights, QLoRA) or null")
        if compute_dtype not in ("bfloat16", "float16", "float32"):
            raise RunnerError(f"mode.compute_dtype={compute_dtype!r}: use bfloat16, float16 or float32")
        if merge and quantize:
            raise RunnerError("mode.merge=true with mode.quantize: merging adapters into 4-bit weights would round them; "
                              "keep merge=false (the saved adapters load onto the full-precision base)")
        self.r, self.alpha, self.dropout, self.merge = r, alpha, dropout, merge
        self.target_modules = list(target_modules) if target_modules else None
        self.quantize, self.compute_dtype = quantize, compute_dtype

    def check_device(self, device: str) -> None:
        if not self.quantize:
            return
        if device != "cuda":
            raise RunnerError(f"mode.quantize={self.quantize} (QLoRA) loads the base weights in 4 bits with bitsandbytes, "
                              f"which needs a CUDA GPU; this run is on {device}: use mode=peft (LoRA on full-precision "
                              f"weights) or run on a GPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise RunnerError("mode.quantize (QLoRA) needs bitsandbytes: pip install bitsandbytes") from err

    def load_options(self) -> dict:
        if not self.quantize:
            return {}
        import torch
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quantize, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype))}

    def targets_for(self, encoder: nn.Module) -> list[str]:
        if self.target_modules:
            return self.target_modules
        family = getattr(encoder.config, "model_type", None)
        if family not in LORA_TARGETS:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in encoder.named_modules() if isinstance(m, nn.Linear)})
            raise RunnerError(
                f"no default LoRA targets for model_type '{family}'; set mode.target_modules to some of "
                f"its linear layers: {linear}"
            )
        return LORA_TARGETS[family]

    def check(self, encoder: nn.Module) -> None:
        """Every target must name some linear layer: peft would silently skip a misspelled one."""
        targets = self.targets_for(encoder)
        names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            linear = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise RunnerError(f"mode.target_modules: {unmatched} match no linear layer of this "
                              f"{getattr(encoder.config, 'model_type', 'encoder')}; its linear layers are {linear}")

    def apply(self, encoder: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        # BERT-style built-in poolers are unused (runner.pooling replaces them): adapters there would never get
        # a gradient, which DDP reports as an error ("parameters that were not used in producing loss")
        unused = [n for n, m in encoder.named_modules() if n.split(".")[0] == "pooler" and isinstance(m, nn.Linear)]
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets_for(encoder),
            exclude_modules=unused or None,
            bias="none",
        )
        if self.quantize:  # QLoRA: norms in fp32, inputs that carry gradients into the adapters
            from peft import prepare_model_for_kbit_training

            encoder = prepare_model_for_kbit_training(encoder, use_gradient_checkpointing=False)
        return get_peft_model(encoder, config)


def transformer_blocks(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers: the ModuleList as long as ``num_hidden_layers``."""
    n = encoder.config.num_hidden_layers
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise RunnerError(f"could not find the {n} transformer layers of {type(encoder).__name__}")
