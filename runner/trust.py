"""A saved model folder is data, never code: what loading may read and build from one.

People share model folders (MLflow artifacts, registries, hubs, zip files), so ``runner.predict``,
``runner.evaluate``, ``runner.export``, the MLflow pyfunc, distillation teachers and ``train.resume``
treat every folder as untrusted input:

- every class it names (pooling, head, task) is looked up in an explicit table of the runner's own
  classes, with only their known arguments, each checked for type; nothing is resolved from a dotted path;
- weights are read from safetensors only: a folder whose weights exist only as pickles (``.bin``, ``.pt``,
  ``.pth``, ``.pkl``, ``.ckpt``) is refused with how to convert it; nothing is unpickled;
- every file it names resolves inside it: no absolute paths, no ``..``, no symbolic link pointing out;
- a base model it names is a Hub id (shown in the log before use) or the package-shipped MiniLM, never a
  local path outside the folder; ``trust_remote_code`` is never set from a folder;
- ``runner_model.json`` is size-capped, and every field is checked for kind and range before use.

Each refusal is one :class:`RunnerError` line naming the folder and what is wrong.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from runner.errors import RunnerError

log = logging.getLogger("runner")

META_LIMIT = 1 << 20  # runner_model.json: a few KB in practice (labels included); 1 MiB leaves ample room
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ENCODER_DIRS = (".", "encoder", "adapter", "base")
TOKENIZER_DIRS = (".", "tokenizer")
TASKS = ("Classify", "MultiLabel", "Regress", "PairSimilarity", "Retrieve", "ImageText", "ZeroShot", "LinearProbe")
DUAL_TYPES = ("clip", "siglip", "vision-text-dual-encoder")  # runner.dual.model_classes
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def read_json(path: Path, limit: int = META_LIMIT):
    """A JSON file of at most ``limit`` bytes, or one line saying why it cannot be read."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise RunnerError(f"{path}: cannot be read ({err.strerror})") from err
    if size > limit:
        raise RunnerError(f"{path} is {size:,} bytes, more than a runner file of this kind holds ({limit:,}): "
                          f"not a runner model file")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunnerError(f"{path} is not valid JSON ({first_line(err)})") from err
    except RecursionError as err:
        raise RunnerError(f"{path} nests too deeply to be a runner model file") from err


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def check_links(folder: Path) -> None:
    """No symbolic link below ``folder`` may point outside it (a shared folder must not read elsewhere)."""
    root = folder.resolve()
    for current, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(current) / name
            if path.is_symlink() and not is_inside(path.resolve(), root):
                raise RunnerError(f"{folder}: {path.relative_to(folder)} is a symbolic link to {os.readlink(path)}, "
                                  f"outside the model folder: a shared model folder must hold its own files")


def is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def inside(folder: Path, name: object, allowed: tuple[str, ...], key: str) -> Path:
    """``folder / name`` for a sub-folder name the runner writes (one of ``allowed``), checked to stay inside."""
    if name not in allowed:
        raise RunnerError(f"{folder}/runner_model.json: {key}={str(name)[:200]!r} is not one of the folders a runner "
                          f"model has ({', '.join(allowed)})")
    path = folder / str(name)
    if not is_inside(path.resolve(), folder.resolve()):
        raise RunnerError(f"{folder}: {key}={name!r} leads outside the model folder")
    return path


def check_weights(directory: Path, what: str) -> None:
    """Weights there must be safetensors; pickled weights alone are refused with the way to convert them."""
    if not directory.is_dir():
        raise RunnerError(f"{directory}: the {what} folder is missing")
    names = [p.name for p in directory.iterdir()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise RunnerError(f"{directory}: the {what} weights are pickle files ({', '.join(sorted(pickles)[:3])}), which "
                          f"can run code when loaded; the runner reads safetensors only. Convert them where you trust "
                          f"the files: AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)")
    raise RunnerError(f"{directory}: no weights (.safetensors) in the {what} folder")


def check_safetensors(path: Path) -> None:
    """A safetensors file that opens: its header parses and every tensor lies inside the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_slice(name).get_shape()
    except Exception as err:  # noqa: BLE001  (safetensors raises its own SafetensorError and OSError)
        raise RunnerError(f"{path} is truncated or not a safetensors file ({first_line(err)}): copy it again "
                          f"from where the model was saved") from err


def check_hub_id(reference: object, folder: Path, key: str = "base_model") -> str:
    """A base model named by a folder: a well-formed Hub id, never a path; shown in the log before use."""
    if not isinstance(reference, str) or not HUB_ID.match(reference) or ".." in reference:
        raise RunnerError(f"{folder}/runner_model.json: {key}={str(reference)[:200]!r} is not a Hugging Face Hub id "
                          f"(org/name): a model folder may name its base model on the Hub, never a local path")
    return reference


# adapter_config.json keys that would make PeftModel.from_pretrained import a module or rebuild the base: must be
# off. (auto_mapping, which peft writes, is read only by AutoPeftModel, which the runner never uses.)
LORA_DEFAULTS = {"megatron_config": None, "megatron_core": "megatron.core", "layer_replication": None}


def check_adapter(directory: Path) -> None:
    """A LoRA adapter folder the runner wrote: a LoRA config with no import hooks, safetensors weights."""
    config = read_json(directory / "adapter_config.json") if (directory / "adapter_config.json").exists() else None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise RunnerError(f"{directory}: not a LoRA adapter folder (adapter_config.json with peft_type LORA)")
    for key, default in LORA_DEFAULTS.items():
        if config.get(key, default) != default:
            raise RunnerError(f"{directory}/adapter_config.json: {key}={str(config[key])[:200]!r} is not used by runner "
                              f"adapters (it makes peft import or rebuild modules): remove it")
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise RunnerError(f"{directory}/adapter_config.json: init_lora_weights={config['init_lora_weights']!r}: runner "
                          f"adapters are saved weights, initialised with true, false or gaussian")
    check_weights(directory, "adapter")


def _number(value) -> bool:
    return type(value) in (int, float)


FIELDS = {  # runner_model.json: what each field may hold (absent fields keep their defaults)
    "task": lambda v: v in TASKS,
    "data_type": lambda v: v in ("single", "pair", "triplet", "image_text", "image"),
    "kind": lambda v: v == "dual",
    "model_type": lambda v: v in DUAL_TYPES,
    "text_padding": lambda v: v in ("longest", "max_length"),
    "prompt": lambda v: isinstance(v, str) and len(v) <= 10_000 and v.count("{}") == 1,
    "joint": lambda v: isinstance(v, bool),
    "threshold": lambda v: v is None or (_number(v) and 0 < v < 1),
    "score_range": lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(map(_number, v)) and v[0] < v[1]),
    "similarity": lambda v: v in ("cosine", "dot"),
    "precision": lambda v: v in ("fp32", "bf16", "fp16"),
    "sentence_transformers": lambda v: isinstance(v, bool),
    "base_revision": lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[\w./-]{1,100}", v) is not None),
    "base_weights_sha256": lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None),
    "labels": lambda v: v is None or (isinstance(v, list) and all(type(x) in (str, int, float, bool) for x in v)),
    "text_prefix": lambda v: isinstance(v, str) and len(v) <= 10_000,
    "max_length": lambda v: type(v) is int and 1 <= v <= 1_000_000,
    "padding_side": lambda v: v in ("left", "right"),
    "dim": lambda v: type(v) is int and 1 <= v <= 1_000_000,
    "normalize": lambda v: isinstance(v, bool),
    "head": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "linear" and set(v) == {
        "type", "in_features", "out_features"} and all(type(v[k]) is int and 1 <= v[k] <= 1_000_000
                                                        for k in ("in_features", "out_features"))),
}


def check_meta(meta: object, folder: Path) -> dict:
    """Every field of runner_model.json checked for kind and range (see FIELDS); the file's dict."""
    where = f"{folder}/runner_model.json"
    if not isinstance(meta, dict):
        raise RunnerError(f"{where} is not a JSON object: not a runner model file")
    for key, ok in FIELDS.items():
        if key in meta and not ok(meta[key]):
            raise RunnerError(f"{where}: {key}={str(meta[key])[:200]!r} is not a valid value for a runner model")
    if meta.get("input") == "embeddings":
        if "dim" not in meta or not isinstance(meta.get("head"), dict):
            raise RunnerError(f"{where}: a head on given embeddings needs dim and head")
        return meta
    if meta.get("kind") == "dual":  # a transformers dual encoder at the folder's root (runner/dual.py)
        for key in ("model_type", "max_length", "data_type"):
            if key not in meta:
                raise RunnerError(f"{where}: {key} is missing: not a complete runner model file")
        return meta
    if "input" in meta:
        raise RunnerError(f"{where}: input={str(meta['input'])[:100]!r}: the only other input is embeddings")
    for key in ("encoder", "pooling", "max_length"):
        if key not in meta:
            raise RunnerError(f"{where}: {key} is missing: not a complete runner model file")
    inside(folder, meta["encoder"], ENCODER_DIRS, "encoder")
    inside(folder, meta.get("tokenizer", "tokenizer"), TOKENIZER_DIRS, "tokenizer")
    labels, head = meta.get("labels"), meta.get("head")
    if head and meta.get("task", "Classify") in ("Classify", "MultiLabel") and (labels is None or len(labels) != head["out_features"]):
        raise RunnerError(f"{where}: {len(labels or [])} labels for a head of {head['out_features']} outputs")
    base = meta.get("base_model")
    if meta["encoder"] == "adapter" and base not in ("base", None):
        check_hub_id(base, folder)
    if meta["encoder"] == "base":
        check_hub_id(base, folder)
        if not meta.get("base_weights_sha256"):
            raise RunnerError(f"{where}: a model that names its base needs base_weights_sha256 (checked on load)")
    return meta


def check_tensors(weights: dict, expected: dict, path: Path) -> None:
    """Loaded head/pooling tensors against the model's own: same names, shapes, floating dtypes, finite."""
    import torch

    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise RunnerError(f"{path}: tensors {missing or extra} {'are missing' if missing else 'are not part of this model'}")
    for name, tensor in weights.items():
        want = expected[name]
        if tensor.shape != want.shape or not tensor.is_floating_point():
            raise RunnerError(f"{path}: {name} is {tensor.dtype} {list(tensor.shape)}, the model needs a floating "
                              f"{list(want.shape)}")
        if not torch.isfinite(tensor).all():
            raise RunnerError(f"{path}: {name} holds NaN or infinite values: the model diverged; it cannot predict")


def read_saved_config(folder: Path) -> dict:
    """The training run's config.yaml saved in a model folder, as plain data: size-capped, no YAML aliases (an
    alias bomb expands exponentially when copied) and no ``${...}`` interpolations (they would read environment
    variables or call resolvers when merged). {} when the folder has none."""
    import yaml

    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    if path.stat().st_size > META_LIMIT:
        raise RunnerError(f"{path} is {path.stat().st_size:,} bytes: more than a runner config holds")

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                raise RunnerError(f"{path} uses YAML aliases (*name), which runner configs never contain")
            return super().compose_node(parent, index)

    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=NoAliases)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RunnerError(f"{path} is not valid YAML ({first_line(err)})") from err
    if not isinstance(config, dict):
        raise RunnerError(f"{path} is not a runner config (a mapping of groups)")
    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and "${" in value:
            raise RunnerError(f"{path} holds an interpolation ({value[:80]!r}); saved runner configs are resolved "
                              f"values: remove it")
    return config
