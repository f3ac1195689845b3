"""A frozen encoder runs once per text (``mode=head_only``): every epoch, fold and evaluation of a job,
and through the disk cache every later job and sweep trial, reuse its output.

What is kept per text is :func:`runner.pooling.frozen_layout` (per-layer token means, first and last
tokens, and the maximum of the averaged layers): every pooling, ``weighted`` included (it is linear in
the hidden states), is computed from it exactly, so a search over poolings encodes each text once.

The disk cache (``cache.enabled``, ``cache.dir``, default ``outputs/cache``) is one SQLite file per
encoder setting: the encoder's weights (a hash of every tensor), the tokenizer, ``max_length``,
``text_prefix``, the pooled layers, the dtype and whether pairs are one sequence. A row per text (keyed
by its sha256) holds the float32 layout. SQLite's locking lets concurrent sweep workers share a file;
rows are written with ``INSERT OR IGNORE``, so two workers that encode the same text agree.

Texts are encoded in a canonical order (sorted by text key, then by length, in batches of
``ENCODE_BATCH``), so a job computes the same vectors whether or not the cache is enabled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import sqlite3
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runner import batching
from runner.data import Dataset
from runner.model import weights_hash
from runner.pooling import frozen_layout

log = logging.getLogger("runner")

ENCODE_BATCH = 64  # fixed, not train.batch_size: a text's vector must not depend on the job's settings


@dataclass
class FrozenFeatures:
    """The frozen layout of every distinct text (or joint pair) of a job's data."""

    vectors: torch.Tensor  # (texts, 3 * layers + 1, hidden), float32
    rows: dict[str, int]  # text key -> row of ``vectors``
    hits: int
    misses: int
    encoder: torch.nn.Module  # the frozen encoder they come from: every fold's model shares it

    pooled_cache: dict = field(default_factory=dict, repr=False)

    def pooled(self, pooling) -> torch.Tensor | None:
        """Every text's vector under ``pooling``, computed once per job and pooling, when the pooling has no
        weights to learn (mean, cls, max, lasttoken, with or without normalize): a head then trains on
        (texts, hidden) rows, not on the whole layout, per step. None for a trainable pooling."""
        if any(True for _ in pooling.parameters()):
            return None
        key = json.dumps(pooling.describe(), sort_keys=True)
        if key not in self.pooled_cache:
            with torch.no_grad():
                self.pooled_cache[key] = pooling.from_frozen(self.vectors).contiguous()
        return self.pooled_cache[key]

    def rows_of(self, texts: list) -> torch.Tensor:
        return torch.as_tensor([self.rows[text_key(t)] for t in texts], dtype=torch.long)


@functools.lru_cache(maxsize=1 << 20)  # k folds and a search's trials look the same texts up again and again
def text_key(text: str | tuple[str, str]) -> str:
    raw = text if isinstance(text, str) else json.dumps(list(text))
    return hashlib.sha256(raw.encode()).hexdigest()


def units(data: Dataset, joint: bool) -> dict[str, str | tuple[str, str]]:
    """The distinct things encoded, by text key: single texts, or (a, b) pairs when a pair is one sequence."""
    seen: dict[str, str | tuple[str, str]] = {}
    for split in (data.train, data.validation, data.test):
        if split is None:
            continue
        items = zip(*split.columns) if joint else (t for column in split.columns for t in column)
        for item in items:
            seen.setdefault(text_key(item), item)
    return seen


TOKENIZER_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a search's trials share one tokenizer


def tokenizer_hash(tokenizer) -> str:
    if tokenizer in TOKENIZER_HASHES:
        return TOKENIZER_HASHES[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    TOKENIZER_HASHES[tokenizer] = hashlib.sha256(text.encode()).hexdigest()
    return TOKENIZER_HASHES[tokenizer]


def settings_hash(weights: str, tokenizer, max_length: int, prefix: str, layers: list[int], dtype: str, joint: bool) -> str:
    """``weights``: the encoder's :func:`runner.model.weights_hash`."""
    setting = {"weights": weights, "tokenizer": tokenizer_hash(tokenizer), "max_length": max_length,
               "prefix": prefix, "layers": list(layers), "dtype": dtype, "joint": joint, "layout": 1}
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:20]


class DiskCache:
    """One SQLite file of (text key -> float32 layout) rows for one encoder setting."""

    def __init__(self, folder: Path, setting: str, shape: tuple[int, int]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.shape = folder / f"frozen-{setting}.db", shape
        self.db = sqlite3.connect(self.path, timeout=300)
        # Switching a new file to WAL takes a lock that SQLite's busy timeout does not wait for: two workers
        # creating the same cache at once would see "database is locked". Retried a while instead.
        deadline = time.monotonic() + 300
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def fill(self, keys: list[str], out: torch.Tensor) -> list[int]:
        """Copy the stored rows of ``keys`` into ``out`` (row i for key i); the indices found."""
        where = {k: i for i, k in enumerate(keys)}
        found = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            query = f"SELECT key, value FROM vectors WHERE key IN ({','.join('?' * len(chunk))})"
            for key, blob in self.db.execute(query, chunk):
                row = where[key]
                out[row].numpy()[...] = np.frombuffer(blob, dtype=np.float32).reshape(self.shape)  # one copy
                found.append(row)
        return sorted(found)

    def put(self, items: dict[str, np.ndarray]) -> None:
        with self.db:  # one transaction
            self.db.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)",
                                [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items.items()])

    def close(self) -> None:
        self.db.close()


@torch.inference_mode()
def encode_into(out: torch.Tensor, rows: torch.Tensor, encoder, tokenizer, items: list, max_length: int, prefix: str,
                layers: list[int], joint: bool, accelerator) -> None:
    """Write the frozen layout of ``items[i]`` into ``out[rows[i]]``, batched by length."""
    columns = [[t[0] for t in items], [t[1] for t in items]] if joint else [items]
    data = batching.Encoded(tokenizer, columns, None, max_length, prefix, joint=joint)
    for batch in batching.make_loader(data, tokenizer, ENCODE_BATCH, train=False):
        features = {k: v.to(accelerator.device) for k, v in batch["features"][0].items()}
        with accelerator.autocast():
            hidden = encoder(**features, output_hidden_states=True, return_dict=True).hidden_states
        out[rows[batch["index"]]] = frozen_layout(hidden, features["attention_mask"], layers).float().cpu()


def frozen_features(encoder, tokenizer, data: Dataset, *, max_length: int, prefix: str, layers: list[int], joint: bool,
                    dtype: str, cache_dir: Path | None, accelerator, weights: str | None = None) -> FrozenFeatures:
    """The layout of every distinct text of ``data``: from the disk cache where present, else computed.
    ``weights``: the encoder's weights hash where already known (it names the cache)."""
    tic = time.perf_counter()
    encoder.eval()
    by_key = units(data, joint)
    keys = sorted(by_key)  # canonical order: independent of the data's order
    items = [by_key[k] for k in keys]
    shape = (3 * len(layers) + 1, encoder.config.hidden_size)
    if cache_dir is None:
        return encode_all(encoder, tokenizer, keys, items, shape, None, max_length, prefix, layers, joint, accelerator, tic)
    from runner import reuse

    setting = settings_hash(weights or weights_hash(encoder), tokenizer, max_length, prefix, layers, dtype, joint)
    # the trials of a search in one process read the disk cache once: the same texts and setting, the same numbers
    texts = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    built = []
    kept = reuse.shared("frozen-features", [setting, texts, str(cache_dir)], lambda: built.append(1) or encode_all(
        encoder, tokenizer, keys, items, shape, DiskCache(cache_dir, setting, shape), max_length, prefix, layers, joint,
        accelerator, tic))
    if built:
        return kept
    log.info("frozen encoder: %d texts, all kept in memory by an earlier job of this process", len(keys))
    return dataclasses.replace(kept, hits=len(keys), misses=0)  # shares the vectors and their poolings


def encode_all(encoder, tokenizer, keys: list[str], items: list, shape: tuple[int, int], cache: DiskCache | None,
               max_length: int, prefix: str, layers: list[int], joint: bool, accelerator, tic: float) -> FrozenFeatures:
    """The layout of ``items`` (sorted by key): from ``cache`` where present, else computed (and stored there)."""
    vectors = torch.empty((len(items), *shape))  # the one copy: hits and new vectors are written into it
    found = cache.fill(keys, vectors) if cache else []
    missing = sorted(set(range(len(keys))) - set(found))
    if missing:
        encode_into(vectors, torch.as_tensor(missing), encoder, tokenizer, [items[i] for i in missing], max_length,
                    prefix, layers, joint, accelerator)
    if cache is not None:
        if accelerator.is_main_process:
            for start in range(0, len(missing), 4096):  # bounded memory for the bytes of one transaction
                cache.put({keys[i]: vectors[i].numpy() for i in missing[start : start + 4096]})
        cache.close()
    log.info("frozen encoder: %d texts, %d from the cache%s, %d encoded (%.1fs)", len(items), len(found),
             f" {cache.path}" if cache else " (cache.enabled=false)", len(missing), time.perf_counter() - tic)
    return FrozenFeatures(vectors, {k: i for i, k in enumerate(keys)}, len(found), len(missing), encoder)
