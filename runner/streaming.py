"""Files larger than memory: a split read into a memory-mapped Arrow file (through ``datasets``, which
parses csv/tsv with pandas chunk by chunk, and jsonl/parquet natively) whose texts stay on disk.

``data.streaming=true`` (or automatic for files above ``data.streaming_above_mb``) gives the same
:class:`runner.data.TextSplit` as the in-memory reader, but its text columns are :class:`ArrowText`:
sequences that read a row from the mapped file when indexed. Tokenization happens in the loader
(runner.batching.LazyTokens); what stays in RAM is one int64 label and a few numbers per row (token
length for length grouping, a text id). Checks (empty texts, unknown labels) run column-wise on Arrow.
The frozen-encoder cache is off for such data: the encoder runs on the batches a job uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runner.errors import DataError

log = logging.getLogger("runner")


class ArrowText(Sequence):
    """One text column of a memory-mapped table, or several joined by ``separator``, over ``rows``."""

    def __init__(self, columns: list, rows: np.ndarray | None = None, separator: str = " ") -> None:
        self.columns, self.separator = columns, separator
        self.rows = np.arange(len(columns[0])) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ArrowText(self.columns, self.rows[i], self.separator)
        row = int(self.rows[i])
        parts = [str(c[row].as_py()).strip() if len(self.columns) > 1 else str(c[row].as_py()) for c in self.columns]
        return self.separator.join(p for p in parts if p) if len(parts) > 1 else parts[0]

    def take(self, index: np.ndarray) -> ArrowText:
        return ArrowText(self.columns, self.rows[np.asarray(index)], self.separator)

    def chunks(self, size: int = 10000):
        """The texts in order, ``size`` at a time (bounded memory)."""
        for start in range(0, len(self), size):
            yield [self[i] for i in range(start, min(start + size, len(self)))]


def should_stream(cfg, path: str) -> bool:
    if cfg.streaming is not None:
        return bool(cfg.streaming)
    return os.path.isfile(path) and os.path.getsize(path) > cfg.streaming_above_mb * 2**20


def arrow_table(path: str, cfg, fmt: str, sep: str | None, encoding: str, quoting: int):
    """The file as a memory-mapped Arrow table (converted once; ``datasets`` caches it by file and options)."""
    import datasets
    import pandas as pd

    cache = Path(cfg_cache_dir()) / "arrow"
    datasets.disable_progress_bars()
    if fmt in ("csv", "tsv", "delimited"):
        first = pd.read_csv(path, sep=sep, quoting=quoting, encoding=encoding, dtype=str, header=None,
                            nrows=1, keep_default_na=False)
        width = first.shape[1]
        names = list(cfg.columns) if cfg.columns else ([str(c) for c in first.iloc[0]] if cfg.header else list(range(width)))
        if len(names) != width:
            raise DataError(f"{path}: data.columns names {len(names)} columns but the file has {width}")
        features = datasets.Features({str(n): datasets.Value("string") for n in names})
        table = datasets.load_dataset("csv", data_files=path, split="train", cache_dir=str(cache), sep=sep,
                                      quoting=quoting, encoding=encoding, header=None,
                                      skiprows=1 if cfg.header else 0, names=[str(n) for n in names],
                                      keep_default_na=False, na_values=[], features=features)
    else:
        table = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=path, split="train",
                                      cache_dir=str(cache))
    log.info("data: %s mapped from disk (%s rows, Arrow cache in %s)", path, f"{len(table):,}", cache)
    return table.data.table  # a pyarrow Table over the memory-mapped file


def cfg_cache_dir() -> str:
    return os.path.abspath(os.environ.get("RUNNER_ARROW_CACHE", "outputs/cache"))


def blank_rows(column, missing: set[str] | None = None) -> np.ndarray:
    """Rows of an Arrow string column that are null, only whitespace, or (lowercased) one of ``missing``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.utf8_trim_whitespace(pc.cast(column, "string"))
    blank = pc.or_(pc.is_null(text), pc.equal(text, ""))
    if missing:
        blank = pc.or_(blank, pc.is_in(pc.utf8_lower(text), value_set=pa.array(sorted(missing))))
    blank = pc.fill_null(blank, True)
    return np.flatnonzero(blank.to_numpy(zero_copy_only=False))


def text_ids(texts: ArrowText) -> np.ndarray:
    """Equal ids for equal texts, from a stable hash (no dictionary of every text in RAM)."""
    out = np.empty(len(texts), dtype=np.int64)
    position = 0
    for chunk in texts.chunks():
        for t in chunk:
            out[position] = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=7).digest(), "little")
            position += 1
    return out


class ArrowFrame:
    """A mapped table as the readers see a frame: column names, and columns by name."""

    def __init__(self, table) -> None:
        self.table = table
        self.columns = list(table.column_names)

    def __getitem__(self, name):
        return self.table.column(name)

    def __len__(self) -> int:
        return self.table.num_rows


class ArrowSelected:
    """The checked columns of a mapped split: ``text0..`` as ArrowText, ``label`` as an Arrow column."""

    def __init__(self, texts: list[ArrowText], label=None) -> None:
        self.texts, self.label = texts, label

    def __len__(self) -> int:
        return len(self.texts[0]) if self.texts else len(self.label)

    def head(self, n: int) -> ArrowSelected:
        keep = np.arange(min(n, len(self)))
        return ArrowSelected([t.take(keep) for t in self.texts], None if self.label is None else self.label.slice(0, len(keep)))

    def __getitem__(self, name: str) -> ColumnView:
        if name == "label":
            return ColumnView(self.label.to_pylist)
        texts = self.texts[int(name.removeprefix("text"))]
        return ColumnView(lambda: texts)


class ColumnView:
    """A selected column as the readers use a pandas one: ``.tolist()`` gives the label values (Python
    objects) or, for texts, the lazy ArrowText itself (they stay on disk)."""

    def __init__(self, values) -> None:
        self.tolist = values


class BatchWriter:
    """String columns written batch by batch to an Arrow file in the cache, then memory-mapped: texts read
    from many sources (files of a folder, lines) that stay on disk. The file is unlinked once mapped (the
    mapping keeps it until the process ends), so nothing is left behind."""

    def __init__(self, names: list[str]) -> None:
        import tempfile

        import pyarrow as pa

        folder = Path(cfg_cache_dir()) / "texts"
        folder.mkdir(parents=True, exist_ok=True)
        handle, self.path = tempfile.mkstemp(suffix=".arrow", dir=folder)
        os.close(handle)
        self.schema = pa.schema([(n, pa.string()) for n in names])
        self.writer = pa.ipc.new_file(self.path, self.schema)

    def write(self, columns: list[list[str]]) -> None:
        import pyarrow as pa

        if columns and len(columns[0]):
            self.writer.write_batch(pa.record_batch([pa.array(c, pa.string()) for c in columns], schema=self.schema))

    def finish(self):
        import pyarrow as pa

        self.writer.close()
        table = pa.ipc.open_file(pa.memory_map(self.path)).read_all()
        os.unlink(self.path)
        return table
