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
        small = len(columns[0]) < 2**31  # row numbers in 4 bytes, not 8: 40 MB less per 10 million rows
        self.rows = np.arange(len(columns[0]), dtype=np.int32 if small else np.int64) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ArrowText(self.columns, self.rows[i], self.separator)
        row = int(self.rows[i])
        touched()
        parts = [str(c[row].as_py()).strip() if len(self.columns) > 1 else str(c[row].as_py()) for c in self.columns]
        return self.separator.join(p for p in parts if p) if len(parts) > 1 else parts[0]

    def take(self, index: np.ndarray) -> ArrowText:
        return ArrowText(self.columns, self.rows[np.asarray(index)], self.separator)  # keeps the rows' dtype

    def chunks(self, size: int = 10000):
        """The texts in order, ``size`` at a time (bounded memory), converted from Arrow a chunk at once."""
        for start in range(0, len(self), size):
            rows = self.rows[start:start + size]
            contiguous = len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all()
            parts = [(c.slice(int(rows[0]), len(rows)) if contiguous else take(c, rows)).to_pylist() for c in self.columns]
            release()  # the pages already read leave this process's resident set
            if len(parts) == 1:
                yield [str(t) for t in parts[0]]
            else:
                yield [self.separator.join(p for p in (str(v).strip() for v in row) if p) for row in zip(*parts)]


def take(column, rows: np.ndarray):
    """``column.take(rows)`` chunk by chunk: pyarrow's ChunkedArray.take first joins every chunk into one
    array, a copy of the whole mapped column (hundreds of MB) for a batch of rows."""
    import pyarrow as pa

    chunks = getattr(column, "chunks", None)
    if chunks is None or len(chunks) == 1:
        return (chunks[0] if chunks else column).take(pa.array(rows))
    starts = np.cumsum([0] + [len(c) for c in chunks])
    which = np.searchsorted(starts, rows, side="right") - 1
    order = np.argsort(which, kind="stable")
    parts, since = [], 0
    for k in np.unique(which):
        local = rows[order][which[order] == k] - starts[k]
        for piece in range(0, len(local), 256):  # copied out 256 rows at a time, their mapped pages released
            parts.append(chunks[k].take(pa.array(local[piece:piece + 256])))
            since += min(256, len(local) - piece)
            if since >= 256:
                release()
                since = 0
    joined = pa.concat_arrays(parts)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return joined.take(pa.array(inverse))


def should_stream(cfg, path: str) -> bool:
    if cfg.streaming is not None:
        return bool(cfg.streaming)
    return os.path.isfile(path) and os.path.getsize(path) > cfg.streaming_above_mb * 2**20


def arrow_table(path: str, cfg, fmt: str, sep: str | None, encoding: str, quoting: int):
    """The file as a memory-mapped Arrow table, converted once per file version and reading options: csv/tsv by
    pandas a chunk at a time (the in-memory reader's parser, so both read the same rows), jsonl/parquet by
    ``datasets``."""
    import pyarrow as pa

    cache = Path(cfg_cache_dir()) / "arrow"
    if fmt in ("csv", "tsv", "delimited"):
        target = delimited_to_arrow(path, cfg, sep, encoding, quoting, cache)
        table = mapped_table(target)
        files = [target]
    else:
        import datasets

        datasets.disable_progress_bars()
        loaded = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=path, split="train",
                                       cache_dir=str(cache))
        files = [f["filename"] for f in loaded.cache_files]
        if not files:  # datasets kept it in memory (it does not for files it converts): use that table
            return loaded.data.table
        tables = [mapped_table(f) for f in files]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    release()
    log.info("data: %s mapped from disk (%s rows, Arrow cache in %s)", path, f"{table.num_rows:,}", cache)
    return table


def delimited_to_arrow(path: str, cfg, sep: str, encoding: str, quoting: int, cache: Path) -> str:
    """An Arrow file of the csv's cells (all strings), written 100,000 rows at a time; reused while the file and
    the reading options are unchanged."""
    import hashlib

    import pandas as pd
    import pyarrow as pa

    options = dict(sep=sep, quoting=quoting, encoding=encoding, dtype=str, header=None, keep_default_na=False, na_values=[])
    first = pd.read_csv(path, nrows=1, **options)
    width = first.shape[1]
    names = [str(n) for n in (list(cfg.columns) if cfg.columns else (first.iloc[0].tolist() if cfg.header else range(width)))]
    if len(names) != width:
        raise DataError(f"{path}: data.columns names {len(names)} columns but the file has {width}")
    if cfg.bad_lines == "truncate":
        raise DataError("data.bad_lines=truncate reads the file in memory: set data.streaming=false, or data.bad_lines=skip")
    stat = os.stat(path)
    key = hashlib.sha256(repr((os.path.abspath(path), stat.st_size, stat.st_mtime_ns, sep, quoting, encoding,
                               cfg.header, names, cfg.bad_lines)).encode()).hexdigest()[:20]
    target = cache / "delimited" / f"{key}.arrow"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    schema = pa.schema([(n, pa.string()) for n in names])
    reader = pd.read_csv(path, names=names, skiprows=1 if cfg.header else 0, chunksize=100_000,
                         on_bad_lines="skip" if cfg.bad_lines == "skip" else "error", **options)
    try:
        with pa.ipc.new_file(str(partial), schema) as writer:
            for chunk in reader:
                writer.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False))
    except UnicodeDecodeError as err:
        from runner import text_encoding

        partial.unlink(missing_ok=True)
        raise text_encoding.not_decodable(path, encoding.removesuffix("-sig"), lambda: open(path, "rb")) from err
    except (pd.errors.ParserError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot be parsed: {str(err).strip()}. Check data.delimiter and data.quoting, or set "
                        f"data.bad_lines=skip") from err
    os.replace(partial, target)
    return str(target)


MAPPINGS: dict = {}  # path -> (file version, memory map, table) of this process's tables on disk


def mapped_table(path: str):
    """An Arrow IPC file (datasets' stream format, or the file format) as a table over a memory map of our own:
    zero-copy, and :func:`release` can drop the pages a pass over it touched from this process's resident
    memory (they stay in the page cache; a later read maps them back)."""
    import mmap

    import pyarrow as pa

    stat = os.stat(path)
    version = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    known = MAPPINGS.get(path)
    if known and known[0] == version:  # the trials of a search in one process map a file once
        return known[2]
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buffer = pa.py_buffer(mapping)
    try:
        table = pa.ipc.open_stream(pa.BufferReader(buffer)).read_all()
    except pa.ArrowInvalid:
        try:
            table = pa.ipc.open_file(pa.BufferReader(buffer)).read_all()
        except pa.ArrowInvalid as err:
            raise DataError(f"{path} is not an Arrow IPC file ({err})") from err
    MAPPINGS[path] = (version, mapping, table)
    release()  # reading the batches' headers mapped pages all over the file
    return table


READS = [0]


def touched() -> None:
    """A row was read at random (a training batch): every 32 rows the mapped pages are released, or the pages
    mapped around each row (the kernel maps 64 KB per fault) would add up to the whole file."""
    READS[0] += 1
    if READS[0] % 32 == 0:
        release()


def release() -> None:
    """Drop the mapped pages of every table on disk from this process's resident set: a pass over ten million
    texts (blank checks, text ids) would otherwise count the whole file as this process's memory."""
    import mmap

    if hasattr(mmap, "MADV_DONTNEED"):
        for _, mapping, _ in MAPPINGS.values():
            mapping.madvise(mmap.MADV_DONTNEED)


def cfg_cache_dir() -> str:
    return os.path.abspath(os.environ.get("RUNNER_ARROW_CACHE", "outputs/cache"))


def blank_rows(column, missing: set[str] | None = None) -> np.ndarray:
    """Rows of an Arrow string column that are null, only whitespace, or (lowercased) one of ``missing``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found, step = [], 1 << 18  # 262,144 rows at a time: the trimmed copy of a whole text column would not fit
    for start in range(0, len(column), step):
        text = pc.utf8_trim_whitespace(pc.cast(column.slice(start, step), "string"))
        blank = pc.or_(pc.is_null(text), pc.equal(text, ""))
        if missing:
            blank = pc.or_(blank, pc.is_in(pc.utf8_lower(text), value_set=pa.array(sorted(missing))))
        found.append(np.flatnonzero(pc.fill_null(blank, True).to_numpy(zero_copy_only=False)) + start)
        release()
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


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
        self.attrs: dict = {}  # as pandas' DataFrame.attrs: what the reader says about the frame (runner.sources)

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

    def __getitem__(self, name: str):
        if name == "label":  # a categorical Series: codes and the distinct labels, no Python object per row
            import pyarrow as pa

            chunks = []
            for i, chunk in enumerate(self.label.chunks):
                chunks.append(chunk.dictionary_encode())
                if i % 64 == 63:
                    release()
            release()
            return pa.chunked_array(chunks, pa.dictionary(pa.int32(), self.label.type)).unify_dictionaries().to_pandas()
        texts = self.texts[int(name.removeprefix("text"))]
        return ColumnView(lambda: texts)


class ColumnView:
    """A selected text column as the readers use a pandas one: ``.tolist()`` gives the lazy ArrowText itself
    (the texts stay on disk)."""

    def __init__(self, values) -> None:
        self.tolist = values


class BatchWriter:
    """Columns (strings, or the types given) written batch by batch to an Arrow file in the cache, then
    memory-mapped: texts read from many sources (files of a folder, lines) that stay on disk. The file is
    unlinked once mapped (the mapping keeps it until the process ends), so nothing is left behind."""

    def __init__(self, names: list[str], types: dict | None = None) -> None:
        import tempfile

        import pyarrow as pa

        folder = Path(cfg_cache_dir()) / "texts"
        folder.mkdir(parents=True, exist_ok=True)
        handle, self.path = tempfile.mkstemp(suffix=".arrow", dir=folder)
        os.close(handle)
        self.schema = pa.schema([(n, (types or {}).get(n, pa.string())) for n in names])
        self.writer = pa.ipc.new_file(self.path, self.schema)

    def write(self, columns: list[list[str]]) -> None:
        import pyarrow as pa

        if columns and len(columns[0]):
            self.writer.write_batch(pa.record_batch([pa.array(c, f.type) for c, f in zip(columns, self.schema)],
                                                    schema=self.schema))

    def finish(self):
        self.writer.close()
        table = mapped_table(self.path)
        os.unlink(self.path)
        return table
