"""What the jobs of one process share: a search's trials run one after another in one process, and each
would otherwise load and check the same tokenizer, model config and frozen encoder again (~1 s a trial on
MiniLM, as much as training a trial's heads on cached features).

Only what a job never changes is shared (never a randomly initialised encoder, whose weights follow the
job's seed): a tokenizer (read-only once loaded), the outcome of checking a
model config, and a frozen encoder (head_only: its weights never train). Each is keyed by every setting
it was built from and, for a local folder, by its files' sizes and modification times: a folder
rewritten between two jobs is loaded again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

KEPT: dict[str, Any] = {}
LIMIT = 4  # entries per kind: a search over several models keeps the latest few, not all of them


def shared(kind: str, settings: Any, build: Callable[[], T], folder: str | None = None) -> T:
    """``build()``'s result, built once per process for these settings (and this state of ``folder``)."""
    key = json.dumps([kind, plain(settings), stamp(folder)], sort_keys=True, default=str)
    if key not in KEPT:
        import torch

        # a build's random draws (weights a checkpoint lacks) must not shift the job's: with or without a
        # kept value, a seeded job draws the same numbers after this call
        with torch.random.fork_rng(devices=[]):
            value = build()  # a build that raises keeps nothing: the next job checks again
        same_kind = [k for k in KEPT if json.loads(k)[0] == kind]
        for old in same_kind[: max(0, len(same_kind) - LIMIT + 1)]:
            del KEPT[old]
        KEPT[key] = value
    return KEPT[key]


def plain(settings: Any) -> Any:
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return dataclasses.asdict(settings)
    if isinstance(settings, (list, tuple)):
        return [plain(s) for s in settings]
    return settings


def stamp(folder: str | None) -> list | None:
    """Sizes and modification times of a local folder's files (two levels: a runner model keeps its encoder and
    tokenizer in sub-folders); None for a hub id or nothing."""
    if not folder:
        return None
    root = Path(os.path.expanduser(folder))
    if not root.is_dir():
        return None
    found = []
    for path in sorted([*root.iterdir(), *(p for d in root.iterdir() if d.is_dir() for p in d.iterdir())]):
        if path.is_file():
            info = path.stat()
            found.append([str(path.relative_to(root)), info.st_size, info.st_mtime_ns])
    return found
