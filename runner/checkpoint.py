"""Checkpoints that a killed run resumes from exactly, written so that a kill can never leave a bad one.

    checkpoints/step-00000120/
      model.safetensors       the trainable weights (head_only: head and pooling; peft: adapters and
                              head; full: the whole model), and ``best.*``: the best evaluation's
                              weights when early stopping keeps them
      optimizer.safetensors   optimizer state tensors (AdamW moments and step counts)
      rng.safetensors         torch CPU (and CUDA) generator states, numpy's MT19937 key
      state.json              TrainState (step, epoch, position in the epoch, loss window, early
                              stopping), the optimizer's param groups, scheduler, grad scaler and Python
                              RNG states, the config fingerprint and hash, the git commit
      COMPLETE.json           sha256 of every file above; written last

A checkpoint is written into ``.tmp-step-*``, every file fsynced, the marker written last, then the
folder renamed into place (a rename is atomic): a folder named ``step-*`` is always whole. On resume a
folder whose marker is missing or whose files do not match their hashes (truncated, corrupt) is
skipped with a warning naming it, and the one before it is used. Only safetensors and JSON are read:
nothing is ever unpickled.

``RUNNER_CRASH_AT=step:N`` or ``checkpoint:N`` SIGKILLs the process right after optimizer step N, or
half-way through writing the checkpoint of step N: the resume tests use it to kill a run at an exact
point, as a pre-empted job or an out-of-memory kill would.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from runner.errors import RunnerError

log = logging.getLogger("runner")

MARKER = "COMPLETE.json"
PREFIX = "step-"
FILES = {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}  # what a marker may list


def crash_point(kind: str, step: int) -> None:
    """SIGKILL this process if ``RUNNER_CRASH_AT`` names this point (see the module docstring)."""
    if os.environ.get("RUNNER_CRASH_AT") == f"{kind}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def nan_point(loss, step: int, rank: int):
    """The loss, or NaN where ``RUNNER_NAN_AT=<rank>:<step>`` names this process and optimizer step: how the
    tests make one process of a launched job diverge."""
    return loss * float("nan") if os.environ.get("RUNNER_NAN_AT") == f"{rank}:{step}" else loss


# ------------------------------------------------------------------------------------------------ write


def save(root: Path, state, parts, meta: dict[str, Any]) -> Path:
    """Write the checkpoint of ``state.step`` under ``root``; returns its folder.

    ``parts``: the loop's model, optimizer, scheduler and accelerator (``runner.train.LoopParts``);
    ``meta``: JSON facts stored beside the state (config fingerprint and hash, MLflow run id).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model = parts.accelerator.unwrap_model(parts.model)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    weights.update({f"best.{n}": t for n, t in (state.best_weights or {}).items()})
    write_tensors(tmp / "model.safetensors", weights)
    crash_point("checkpoint", state.step)
    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_tree = to_json_tree(parts.optimizer.state_dict(), "", optimizer_tensors)
    write_tensors(tmp / "optimizer.safetensors", optimizer_tensors)
    rng_tensors, rng_json = rng_state()
    write_tensors(tmp / "rng.safetensors", rng_tensors)
    scaler = parts.accelerator.scaler
    document = {
        "train_state": {f.name: getattr(state, f.name) for f in fields(state) if f.name != "best_weights"},
        "optimizer": optimizer_tree,
        "scheduler": to_json_tree(parts.scheduler.state_dict(), "", {}),
        "scaler": None if scaler is None else to_json_tree(scaler.state_dict(), "", {}),
        "rng": rng_json,
        "git_commit": git_commit(),
        **meta,
    }
    write_text(tmp / "state.json", json.dumps(document, indent=1))
    hashes = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
    write_text(tmp / MARKER, json.dumps({"files": hashes}))
    fsync_dir(tmp)
    if final.exists():  # the same step checkpointed again (an epoch end right after a step checkpoint)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    return final


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    fsync_file(path)


def write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_json_tree(value, name: str, tensors: dict[str, torch.Tensor]):
    """A state dict as JSON: tensors moved to ``tensors`` (referenced by name), tuples as lists and
    dicts with non-string keys (the optimizer's per-parameter state) as item lists."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: to_json_tree(v, f"{name}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, to_json_tree(v, f"{name}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [to_json_tree(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {name!r} in a checkpoint")


def from_json_tree(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: from_json_tree(v, tensors) for k, v in value["__items__"]}
        return {k: from_json_tree(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_tree(v, tensors) for v in value]
    return value


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    version, mt, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(key.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": [version, list(mt), gauss], "numpy": [kind, pos, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], saved: dict) -> None:
    version, mt, gauss = saved["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@functools.cache  # it cannot change while the process runs: one `git` call, not one per checkpoint
def git_commit() -> str | None:
    """The commit of the runner's own source, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ------------------------------------------------------------------------------------------------- read


def verify(folder: Path) -> str | None:
    """Why ``folder`` is not a usable checkpoint (None when it is whole)."""
    marker = folder / MARKER
    if not marker.exists():
        return f"no {MARKER}: it was not finished"
    try:
        hashes = json.loads(marker.read_text())["files"]
        assert isinstance(hashes, dict) and set(hashes) <= FILES
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        return f"{MARKER} is unreadable"
    if any((folder / name).is_symlink() for name in hashes):  # a checkpoint holds its own files (runner.trust)
        return "it links to files elsewhere"
    for name, digest in hashes.items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if sha256(path) != digest:
            return f"{name} does not match its hash (truncated or corrupt)"
    return None


def find_latest(root: Path) -> Path | None:
    """The newest whole checkpoint under ``root``; incomplete or corrupt ones are skipped with a warning."""
    if not root.is_dir():
        return None
    for tmp in root.glob(".tmp-*"):
        log.warning("checkpoint %s was being written when the run stopped: ignoring it", tmp)
    for folder in sorted(root.glob(f"{PREFIX}*"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def restore(folder: Path, state, parts, fingerprint: dict[str, str]) -> dict[str, Any]:
    """Load a checkpoint into the loop's objects and ``state``; returns its JSON document.

    RNG states are restored too, so call this last before the loop starts. A checkpoint folder is data
    (it may come from elsewhere): JSON and safetensors only, tensors checked against the model, and anything
    that does not fit this run is one line, never a traceback.
    """
    from runner import trust

    document = trust.read_json(folder / "state.json", limit=64 << 20)
    if not isinstance(document, dict) or not isinstance(document.get("train_state"), dict):
        raise RunnerError(f"checkpoint {folder}: state.json is not a runner checkpoint state")
    try:
        check_fingerprint(folder, document.get("fingerprint", {}), fingerprint)
        return load_into(folder, document, state, parts)
    except RunnerError:
        raise
    except Exception as err:  # noqa: BLE001  a damaged or foreign checkpoint: say so in one line
        raise RunnerError(f"checkpoint {folder} cannot be restored into this run ({trust.first_line(err)}): start a "
                          f"new run folder (or train.resume=never)") from err


def load_into(folder: Path, document: dict, state, parts) -> dict[str, Any]:
    from runner import trust

    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        trust.check_safetensors(folder / name)
    weights = load_file(str(folder / "model.safetensors"))
    model = parts.accelerator.unwrap_model(parts.model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    current = {k: v for k, v in weights.items() if not k.startswith("best.")}
    if set(current) != set(trainable):
        raise RunnerError(f"checkpoint {folder} holds other trainable weights than this model: "
                          f"start a new run folder (or train.resume=never)")
    best_saved = {k[5:]: v for k, v in weights.items() if k.startswith("best.")}
    trust.check_tensors(current, trainable, folder / "model.safetensors")
    if best_saved:
        trust.check_tensors(best_saved, trainable, folder / "model.safetensors")
    known = {f.name for f in fields(state)} - {"best_weights"}
    if not set(document["train_state"]) <= known:
        raise RunnerError(f"checkpoint {folder}: state.json names loop state this runner does not keep "
                          f"({sorted(set(document['train_state']) - known)[:5]})")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(current[name])
    parts.optimizer.load_state_dict(from_json_tree(document["optimizer"], load_file(str(folder / "optimizer.safetensors"))))
    parts.scheduler.load_state_dict(from_json_tree(document["scheduler"], {}))
    if document["scaler"] is not None and parts.accelerator.scaler is not None:
        parts.accelerator.scaler.load_state_dict(document["scaler"])
    for key, value in document["train_state"].items():
        setattr(state, key, value)
    best = {k[5:]: v.to(next(iter(trainable.values())).device) for k, v in weights.items() if k.startswith("best.")}
    state.best_weights = best or None
    set_rng_state(load_file(str(folder / "rng.safetensors")), document["rng"])
    return document


def check_fingerprint(folder: Path, saved: dict[str, str], current: dict[str, str]) -> None:
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k, '(unset)')} -> {current.get(k, '(unset)')}" for k in changed[:6])
        raise RunnerError(
            f"checkpoint {folder} was written by a different config ({shown}"
            f"{', ...' if len(changed) > 6 else ''}): run it with the same settings to resume, or start over "
            f"with train.resume=never"
        )


def prune(root: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest ``keep`` checkpoints and the one of the best evaluation step."""
    folders = sorted(root.glob(f"{PREFIX}*"))
    best = f"{PREFIX}{best_step:08d}" if best_step is not None else None
    for folder in folders[: max(len(folders) - keep, 0)]:
        if folder.name != best:
            shutil.rmtree(folder, ignore_errors=True)
