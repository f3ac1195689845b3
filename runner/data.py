"""Reading labelled text from local files or the hub, with errors that name file, row and column.

Local files: csv, tsv, jsonl, parquet (format from the extension unless ``data.format`` is set; the
delimiter of any other extension, such as .txt, is sniffed and logged). Files are read as they come:
headerless (``data.header=false`` with ``data.columns`` or 0-based positions), blank lines skipped, CRLF
and a byte-order mark handled, quoted newlines kept, and a stray quote that would swallow the lines after
it is an error. A text field may join several columns (``data.text_field=[title,description]``). One file
may hold every split in a column (``data.split_field`` / ``data.split_values``).
Hub datasets: ``data.hub`` names the dataset and ``data.train`` / ``validation`` / ``test`` its splits;
a value that is an existing file wins over a split name, so a hub config also takes local paths.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import ListConfig

from runner import compression, sources, streaming, text_encoding
from runner.errors import DataError
from runner.schema import IMAGE_TYPES, DataConfig, DataType

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
READERS = ("csv", "tsv", "jsonl", "parquet", "arrow", "lines", "delimited")
DELIMITERS = {"comma": ",", "semicolon": ";", "tab": "\t", "pipe": "|", "space": " ", "\\t": "\t"}
SPLITS = ("train", "validation", "test")
log = logging.getLogger("runner")
FIELD_KEYS = {DataType.single: "text_field", DataType.pair: "text_fields", DataType.triplet: "anchor_field/positive_field/negative_field",
              DataType.image_text: "image_field/text_field", DataType.image: "image_field"}
QUOTING = {"minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL, "nonnumeric": csv.QUOTE_NONNUMERIC, "none": csv.QUOTE_NONE}


@dataclass
class TextSplit:
    """One split: one text column (single), two (pair) or three (triplet), and the targets.

    ``labels`` are int64 class ids, float scores, a multi-hot float matrix (multi-label), or None
    (triplets: the positive is the target).
    """

    columns: list[list[str]]
    labels: np.ndarray | None
    vectors: np.ndarray | None = None  # (rows, dim) given embeddings instead of texts (data.embedding_*)

    @property
    def texts(self) -> list[str]:
        return self.columns[0]

    def __len__(self) -> int:
        return len(self.vectors) if self.vectors is not None else len(self.columns[0])

    def subset(self, index: np.ndarray) -> TextSplit:
        labels = None if self.labels is None else self.labels[index]
        vectors = None if self.vectors is None else self.vectors[index]
        columns = [col.take(index) if hasattr(col, "take") else [col[i] for i in index] for col in self.columns]
        return TextSplit(columns, labels, vectors)

    @property
    def streamed(self) -> bool:
        """Texts that stay on disk (runner.streaming): tokenized in the loader, no frozen-feature cache."""
        return any(hasattr(col, "take") for col in self.columns)


@dataclass
class Dataset:
    train: TextSplit
    validation: TextSplit | None  # None only when asked not to split one off (k-fold makes its own)
    test: TextSplit | None
    label_names: list  # id -> original label (str or int), saved with the model; [] for scores/triplets
    sources: list = field(default_factory=list)  # runner.sources.Count of every source read


def text_fields(cfg: DataConfig) -> list[str]:
    """The text columns of the configured data type, in model order."""
    by_type = {
        DataType.single: [cfg.text_field],
        DataType.pair: list(cfg.text_fields),
        DataType.triplet: [f for f in (cfg.anchor_field, cfg.positive_field, cfg.negative_field) if f],
        DataType.image_text: [cfg.image_field, cfg.text_field],
        DataType.image: [cfg.image_field],
    }
    return by_type[cfg.type]


def load_dataset(cfg: DataConfig, target: str = "class", need_validation: bool = True,
                 score_range: list[float] | None = None) -> Dataset:
    """Read, check and encode the configured splits.

    ``target``: "class" (label map of strings or ints), "score" (floats), "multi_label" (several labels
    per row, split on ``data.label_separator``) or "none" (triplets). Without a validation file, a
    seeded part of train (stratified for classes) becomes validation, unless ``need_validation`` is
    false (k-fold: the held-out folds validate, and a validation file is not read).
    """
    if not cfg.train:
        raise DataError("data.train is not set: give a file path (data=csv data.train=path/to/train.csv)")
    if cfg.type == DataType.pair and len(cfg.text_fields) != 2:
        raise DataError(f"data.type=pair needs two data.text_fields, got {list(cfg.text_fields)}")
    vector_input = cfg.given_embeddings
    fields = [] if vector_input else text_fields(cfg)
    label = None if target == "none" else cfg.label_field
    raw = [cfg.embedding_field] if cfg.embedding_field else []
    tally = sources.Tally()
    frames = read_splits(cfg, fields, label, raw, need_validation, tally)
    train = frames["train"]
    if cfg.max_train_samples:
        train = train.head(cfg.max_train_samples)
    validation, test = frames.get("validation"), frames.get("test")

    label_names = label_map(train["label"], target, cfg.label_separator) if target in ("class", "multi_label") else []
    if target == "class":
        warn_rare_classes(train["label"], where=sources.describe(cfg.train))
    if target == "class" and len(label_names) < 2:
        first = f"its first {cfg.max_train_samples} rows (data.max_train_samples) have" if cfg.max_train_samples else "has"
        raise DataError(f"data.train {cfg.train}: {first} a single class ({label_names[0]!r} in column "
                        f"{cfg.label_field!r}): a classifier needs at least two; check data.label_field")

    def encode(df: pd.DataFrame, split: str) -> TextSplit:
        targets = None if label is None else encode_targets(df["label"], target, label_names, split, cfg, score_range)
        vectors = read_vectors(cfg, df, split) if vector_input else None
        return TextSplit([df[f"text{i}"].tolist() for i in range(len(fields))], targets, vectors)

    train_split = encode(train, "train")
    if validation is not None:
        val_split = encode(validation, "validation")
    elif need_validation:
        train_split, val_split = split_off_validation(train_split, cfg.validation_split, cfg.seed)
    else:
        val_split = None
    test_split = encode(test, "test") if test is not None else None
    streaming.release()  # the pages of files on disk that the checks read are not this job's memory
    return Dataset(train_split, val_split, test_split, named_labels(label_names, cfg.label_names, target),
                   [asdict(c) for c in tally])


def class_counts(labels: pd.Series) -> pd.Series:
    """Rows per distinct label (surrounding spaces are not part of a label), counted per category: one pass
    in C over millions of rows, no Python object per row."""
    counts = labels.astype("category").value_counts()
    keys = [k.strip() if isinstance(k, str) else k for k in counts.index.tolist()]
    return pd.Series(counts.to_numpy(), index=pd.Index(keys, dtype=object)).groupby(level=0, sort=False).sum()


def warn_rare_classes(labels: pd.Series, where) -> None:
    """A class seen once cannot be both learned and checked (stratified folds, validation splits): say so. The
    warning is in runner.log, which every run logs to MLflow."""
    counts = class_counts(labels)
    rare = counts[counts < 2]
    if len(rare):
        log.warning("data.train %s: %d classes occur in fewer than 2 training rows (%s): they can barely be learned "
                    "and not be validated; add rows or merge them", where, len(rare),
                    ", ".join(repr(k) for k in list(rare.index)[:10]))


def named_labels(labels: list, names, target: str) -> list:
    """The label list with ``data.label_names`` applied ({1: World}): every label needs a name, and every
    name a label, so a typo cannot leave a class under its code."""
    if names is None:
        return labels
    if target not in ("class", "multi_label"):
        raise DataError(f"data.label_names renames class labels; this task's targets are {target}s")
    if not isinstance(names, Mapping):
        raise DataError(f"data.label_names must map labels to names ({{1: World, 2: Sports}}), got {names!r}")
    given = {str(k).strip(): str(v) for k, v in names.items()}
    unknown = [k for k in given if k not in {str(label) for label in labels}]
    unnamed = [label for label in labels if str(label) not in given]
    if unknown or unnamed:
        problem = f"{unknown} are not labels of the training data" if unknown else f"{unnamed} have no name"
        raise DataError(f"data.label_names: {problem}; the labels are {labels}")
    renamed = [given[str(label)] for label in labels]
    if len(set(renamed)) != len(renamed):
        raise DataError(f"data.label_names gives two labels the same name: {renamed}")
    return renamed


def read_splits(cfg: DataConfig, fields: list, label, raw: list, need_validation: bool,
                tally: sources.Tally | None = None) -> dict[str, pd.DataFrame]:
    """The configured splits as frames of ``text0..``, ``label`` and ``embedding`` columns."""
    if cfg.split_field is not None:
        return split_by_column(cfg, fields, label, raw, need_validation)
    located = sources.split_sources(cfg)
    wanted = ["train"] + [s for s in ("validation", "test") if s in located and (s == "test" or need_validation)]
    out = {}
    for split in wanted:
        frame, where = read_source(cfg, split, located[split], tally)
        out[split] = select(cfg, frame, where, fields, label, raw)
        if tally and len(out[split]) < len(frame):  # data.missing_labels=drop
            tally[-1].skipped["rows without a label (data.missing_labels=drop)"] = len(frame) - len(out[split])
        if cfg.type in IMAGE_TYPES:
            out[split] = image_rows(cfg, out[split], located[split], where, tally)
    return out


def image_rows(cfg: DataConfig, frame: pd.DataFrame, source, where: str, tally: sources.Tally | None) -> pd.DataFrame:
    """A split's image column as absolute paths (relative ones start at the data file's folder), every image
    checked: a bad one is an error naming file, row and column, or a skipped row counted (data.bad_images=skip)."""
    from runner import images

    if isinstance(frame, streaming.ArrowSelected):
        raise DataError(f"{where}: image data is read in memory (paths are small): set data.streaming=false")
    if not isinstance(source, str):
        raise DataError(f"{where}: images are read from a table (csv, tsv, jsonl, parquet, a saved or hub dataset) whose "
                        f"column {cfg.image_field!r} holds image paths or the images; this split is {sources.describe(source)}")
    # relative paths start at the data file's folder (a saved dataset's own folder; a hub split: here)
    base = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else source if os.path.isdir(source) else "."
    paths, keep, skipped = images.checked_paths(frame["text0"].tolist(), base, where, cfg.image_field, cfg.bad_images,
                                                lambda row: row_number(row, where))
    frame = frame.assign(text0=paths)[keep].reset_index(drop=True)
    if tally:
        tally[-1].skipped.update(skipped)
    if frame.empty:
        raise DataError(f"{where}: no row has a readable image (data.bad_images=skip skipped them all)")
    return frame


def split_by_column(cfg: DataConfig, fields: list, label, raw: list, need_validation: bool) -> dict[str, pd.DataFrame]:
    """Every split from data.train's one file, by the value of its ``data.split_field`` column."""
    values = cfg.split_values
    if not isinstance(values, Mapping) or "train" not in values or set(values) - set(SPLITS):
        raise DataError(f"data.split_field needs data.split_values mapping train (and validation, test) to the "
                        f"values of that column, e.g. data.split_values={{train: TRAIN, test: TEST}}; got {values!r}")
    clash = [s for s in ("validation", "test") if getattr(cfg, s)]
    if clash:
        raise DataError(f"data.split_field takes every split from data.train's file; unset data.{clash[0]} "
                        f"(data.{clash[0]}=null) or drop data.split_field")
    frame, where = read_source(cfg, "train")
    if isinstance(frame, streaming.ArrowFrame):
        raise DataError("data.split_field reads the file in memory: set data.streaming=false (or split the file)")
    cells = frame[resolve_column(cfg, frame, cfg.split_field, "split_field", where)].map(lambda v: str(v).strip())
    wanted = {split: str(value).strip() for split, value in values.items()}
    out, counts = {}, []
    for split, value in wanted.items():
        rows = frame[(cells == value).to_numpy()].reset_index(drop=True)
        if rows.empty:
            raise DataError(f"{where}: no row has {value!r} in column {cfg.split_field!r} (data.split_values.{split}); "
                            f"its values are {sorted(cells.unique().tolist())[:20]}")
        counts.append(f"{split} {len(rows):,} ({value})")
        if split != "validation" or need_validation:
            out[split] = select(cfg, rows, f"{where} [{value}]", fields, label, raw)
    other = cells[~cells.isin(list(wanted.values()))]
    dropped = "" if other.empty else f"; {len(other):,} rows with other values dropped ({other.value_counts().to_dict()})"
    log.info("data: %s by column %r: %s%s", where, cfg.split_field, ", ".join(counts), dropped)
    return out


def read_source(cfg: DataConfig, split: str, source=None, tally: sources.Tally | None = None) -> tuple[pd.DataFrame, str]:
    """The whole table of one split and how messages name it. ``source`` (default: the configured value) is a
    file, a folder or a mapping label -> file/folder (runner.sources), or a hub split name."""
    source = getattr(cfg, split) if source is None else source
    if isinstance(source, Mapping):
        return sources.read_mapping(cfg, source, split, tally, read_file), f"data.{split} {sources.describe(source)}"
    if not isinstance(source, str):
        raise DataError(f"data.{split}={source!r}: give a file, a folder or a mapping label -> file "
                        f"(data.{split}={{pos: pos.txt, neg: neg.txt}})")
    if os.path.exists(source) or not cfg.hub:
        return read_file(cfg, source, split, tally), source
    frame = read_hub_split(cfg, source)
    sources.record(tally, sources.Count(split, f"{cfg.hub} [{source}]", len(frame)))
    return frame, f"{cfg.hub} [{source}]"


def read_file(cfg: DataConfig, path: str, split: str, tally: sources.Tally | None = None):
    """A file or folder as its layout says (runner.sources.LAYOUTS for folders)."""
    if os.path.isdir(path):
        return sources.read_folder(cfg, path, split, tally)
    return read_table(path, cfg, split, tally)


def select(cfg: DataConfig, frame: pd.DataFrame, where: str, fields: list, label, raw: list) -> pd.DataFrame:
    """Checked ``text0..`` (strings; several columns joined by data.text_join), ``label`` and ``embedding``
    columns. A blank text or label is an error that names its row and column."""
    if isinstance(frame, streaming.ArrowFrame):
        return select_arrow(cfg, frame, where, fields, label, raw)
    if not frame.index.equals(pd.RangeIndex(len(frame))):  # positions and labels agree below
        frame = frame.reset_index(drop=True)
    out = {}
    keys = FIELD_KEYS[cfg.type].split("/") if "/" in FIELD_KEYS[cfg.type] else [FIELD_KEYS[cfg.type]] * len(fields)
    for i, (spec, key) in enumerate(zip(fields, keys)):
        specs = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
        if not specs:
            raise DataError(f"data.{key} is an empty list: name at least one column")
        columns = [resolve_column(cfg, frame, s, key, where) for s in specs]
        parts = [checked(frame[c], c, where, required=len(columns) == 1).astype(str).str.strip() for c in columns]
        text = parts[0] if len(parts) == 1 else joined(parts, cfg.text_join)
        if len(parts) > 1 and (text == "").any():
            row = int(np.flatnonzero((text == "").to_numpy())[0])
            raise DataError(f"{where}: row {row_number(row, where)}: columns {columns} are all empty")
        out[f"text{i}"] = frame[columns[0]].astype(str) if len(parts) == 1 else text
    for column in raw:
        out["embedding"] = checked(frame[resolve_column(cfg, frame, column, "embedding_field", where)], column, where)
    selected = pd.DataFrame(out)
    if label is not None:
        name = resolve_column(cfg, frame, label, "label_field", where)
        missing = missing_labels(frame[name])
        if len(missing):
            refuse_or_count_missing(cfg, missing, name, where)
            selected, frame = selected.drop(index=missing), frame.drop(index=missing)
        selected["label"] = frame[name]
    return selected.reset_index(drop=True)


# Cells that mean "no label" in exported tables (pandas, R, SQL, Python): never a class of their own.
MISSING = {"", "nan", "na", "n/a", "null", "none", "<na>"}


def missing_labels(values: pd.Series) -> np.ndarray:
    """Positions of label cells that are absent: null, blank, or one of the MISSING spellings."""
    text = values.map(lambda v: v.strip().lower() if isinstance(v, str) else v)
    return np.flatnonzero((values.isna() | text.isin(MISSING)).to_numpy())


def refuse_or_count_missing(cfg: DataConfig, rows: np.ndarray, column, where: str) -> None:
    shown = ", ".join(str(row_number(int(r), where)) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    if cfg.missing_labels != "drop":
        raise DataError(f"{where}: {len(rows):,} rows have no label in column {column!r} (empty, NaN, NA, null or "
                        f"None; rows {shown}): fill them in, or drop them with data.missing_labels=drop")
    log.warning("%s: %d rows without a label in column %r dropped (data.missing_labels=drop; rows %s)",
                where, len(rows), column, shown)


def select_arrow(cfg: DataConfig, frame: streaming.ArrowFrame, where: str, fields: list, label, raw: list) -> streaming.ArrowSelected:
    """What runner.data.select gives for a mapped table: lazy texts, checked column-wise."""
    if raw:
        raise DataError("given embeddings (data.embedding_field) are read in memory: set data.streaming=false")
    names = pd.DataFrame(columns=frame.columns)  # resolve_column needs only the names (and what the reader said)
    names.attrs.update(frame.attrs)
    texts = []
    for spec in fields:
        specs = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
        columns = [resolve_column(cfg, names, s, FIELD_KEYS[cfg.type], where) for s in specs]
        bad = streaming.blank_rows(frame[columns[0]]) if len(columns) == 1 else []  # joined parts may be empty
        if len(bad):
            raise DataError(f"{where}: row {row_number(int(bad[0]), where)}, column {columns[0]!r} is empty")
        texts.append(streaming.ArrowText([frame[c] for c in columns], separator=cfg.text_join))
    label_column = None
    if label is not None:
        name = resolve_column(cfg, names, label, "label_field", where)
        bad = streaming.blank_rows(frame[name], MISSING)
        if len(bad):
            if cfg.missing_labels == "drop":
                raise DataError(f"{where}: data.missing_labels=drop reads the file in memory: set data.streaming=false")
            refuse_or_count_missing(cfg, bad, name, where)
        label_column = frame[name]
    return streaming.ArrowSelected(texts, label_column)


def joined(parts: list[pd.Series], separator: str) -> pd.Series:
    """Row by row, the non-empty parts joined (an empty title does not leave a stray separator)."""
    return pd.Series([separator.join(p for p in row if p) for row in zip(*(p.tolist() for p in parts))])


def checked(values: pd.Series, column, where: str, required: bool = True) -> pd.Series:
    blank = values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())
    if required and blank.any():
        row = int(np.flatnonzero(blank.to_numpy())[0])
        raise DataError(f"{where}: row {row_number(row, where)}, column {column!r} is empty")
    return values.where(~blank, "")


def resolve_column(cfg: DataConfig, frame: pd.DataFrame, spec, key: str, where: str):
    """The frame column a field names: a column name, or a 0-based position (``data.text_field=1``)."""
    columns = list(frame.columns)
    if spec in columns:
        return spec
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        position = int(spec)
        if position < len(columns):
            return columns[position]
        raise DataError(f"{where}: data.{key}={spec} is column position {position} (0-based), but the file has "
                        f"{len(columns)} columns: {columns}")
    if not cfg.header and not cfg.columns:
        raise DataError(f"{where}: data.header=false and the columns have no names: name them "
                        f"(data.columns=[label,text]) or refer to them by 0-based position (data.{key}=1)")
    if key == "label_field" and frame.attrs.get(sources.UNLABELLED):  # a layout without labels says how to add them
        raise DataError(f"{where}: {frame.attrs[sources.UNLABELLED]}")
    one_line = len(columns) == 1 and any(c in str(columns[0]) for c in ",;\t|")
    hint = ("the whole line is one column: set data.delimiter (comma, semicolon, tab, pipe or the character)"
            if one_line else "the file has a single column: a labelled file needs a text and a label column (one example "
            "per line carries no label: give labels by source, data.train={pos: pos.txt, neg: neg.txt})"
            if len(columns) == 1 else "if the file's first line is data, not column names, set data.header=false "
            "and name the columns (data.columns=[...])")
    raise DataError(f"{where}: no column {spec!r} (data.{key}); the file has columns {columns}. Set data.{key}; {hint}")


def read_vectors(cfg: DataConfig, frame: pd.DataFrame, split: str) -> np.ndarray:
    """The given embedding of every row of a split: (rows, dim) float32, all finite, one dimension."""
    if cfg.embedding_field:
        where, cells = getattr(cfg, split), frame["embedding"].tolist()
        rows = []
        for row, cell in enumerate(cells):
            try:
                rows.append(np.asarray(json.loads(cell) if isinstance(cell, str) else cell, dtype=np.float32))
            except (ValueError, TypeError) as err:
                raise DataError(f"{where}: row {row_number(row, where)}, column {cfg.embedding_field!r} is not a list "
                                f"of numbers") from err
        dims = {r.shape for r in rows}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            bad = next(i for i, r in enumerate(rows) if r.shape != rows[0].shape or r.ndim != 1)
            raise DataError(f"{where}: row {row_number(bad, where)}, column {cfg.embedding_field!r} has "
                            f"{rows[bad].shape} numbers where the first row has {rows[0].shape}: every vector "
                            f"needs the same length")
        vectors = np.stack(rows)
    else:
        path = getattr(cfg, f"{split}_embeddings")
        if not path:
            raise DataError(f"data.{split}_embeddings is not set: with data.train_embeddings every split needs its "
                            f"vector file")
        vectors = load_vector_file(path)
        if split == "train":  # data.max_train_samples keeps the first rows: the file's too
            vectors = vectors[: len(frame)]
        if len(vectors) != len(frame):
            raise DataError(f"data.{split}_embeddings={path} has {len(vectors)} rows, data.{split} has {len(frame)}: "
                            f"they must be aligned row by row")
    if not np.isfinite(vectors).all():
        row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise DataError(f"data.{split}: the embedding of row {row + 1} is not finite (NaN or inf)")
    return vectors.astype(np.float32)


def load_vector_file(path: str) -> np.ndarray:
    """A (rows, dim) array from .npy (never unpickled) or .safetensors (its one tensor)."""
    if not os.path.exists(path):
        raise DataError(f"embeddings file not found: {path}")
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise DataError(f"{path}: not a numeric .npy array ({err})") from err
    elif path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(path)
        if len(tensors) != 1:
            raise DataError(f"{path} holds {len(tensors)} tensors ({list(tensors)}): save exactly one")
        array = next(iter(tensors.values()))
    else:
        raise DataError(f"embeddings file {path} is neither .npy nor .safetensors")
    if array.ndim != 2:
        raise DataError(f"{path}: an array of shape {array.shape}; expected (rows, dim)")
    return array


def row_number(index: int, where: str) -> int:
    """1-based line number in the file as a user sees it (header line counted for csv/tsv)."""
    return index + 2 if Path(where).suffix.lower() in (".csv", ".tsv", ".txt") else index + 1


BINARY_MAGIC = {b"PK\x03\x04": "a zip archive (or an .xlsx/.docx file)", b"PAR1": "a parquet file (name it .parquet or set data.format=parquet)",
                b"\x89PNG": "a PNG image", b"%PDF": "a PDF document", b"\xff\xd8\xff": "a JPEG image",
                b"ARROW1": "an Arrow file (name it .arrow or set data.format=arrow)",
                **{magic: f"{name}-compressed inside a compressed file" for magic, (name, _) in compression.MAGIC.items()}}


def check_text(path: str, head: bytes, encoding: str) -> None:
    """A binary file is named as such (an encoding cannot fix it): NUL bytes or a known binary signature at the
    start (of the decompressed bytes). UTF-16/32 text, which has NUL bytes, is fine when data.encoding says so."""
    kind = next((what for magic, what in BINARY_MAGIC.items() if head.startswith(magic)), None)
    if kind is None and head[257:262] == b"ustar":
        kind = "a tar archive (extract it, e.g. tar xf, and give the file or folder inside)"
    if kind is None and b"\0" in head and not encoding.lower().replace("_", "-").startswith(("utf-16", "utf-32")):
        kind = "binary (it holds NUL bytes), not text"
    if kind:
        raise DataError(f"{path} looks {'like ' if kind.startswith('a ') else ''}{kind}: give a text table (csv, tsv, "
                        f"txt, jsonl), a parquet or Arrow file, or one of these compressed (.gz, .bz2, .xz, .zst, .zip)")


def read_table(path: str, cfg: DataConfig, split: str, tally: sources.Tally | None = None) -> pd.DataFrame:
    """A whole local file as read: named columns (header, data.columns) or positions (data.header=false); one
    example per line (data.format=lines, or a .txt file without a delimiter). Compressed files read as their
    inner format (runner.compression)."""
    if not os.path.exists(path):
        raise DataError(f"data.{split}: file not found: {path} (relative paths start from {os.getcwd()})")
    if os.path.getsize(path) == 0:
        raise DataError(f"data.{split}: {path} is empty")
    fmt = cfg.format or FORMATS.get(Path(compression.inner_name(path)).suffix.lower()) or "delimited"
    if fmt not in READERS:
        raise DataError(f"data.format={fmt!r} is not one of csv, tsv, jsonl, parquet, arrow, lines")
    if cfg.quoting not in QUOTING:
        raise DataError(f"data.quoting={cfg.quoting!r} is not one of {list(QUOTING)}")
    if cfg.bad_lines not in ("error", "skip", "truncate"):
        raise DataError(f"data.bad_lines={cfg.bad_lines!r} is not one of error, skip, truncate")
    if fmt == "arrow":
        return sources.read_arrow(cfg, [compression.plain_file(path, Path(streaming.cfg_cache_dir()))], {}, path, split, tally)

    def opener():
        return compression.open_binary(path)

    if fmt != "parquet":
        with opener() as f:
            head = f.read(8192)
        check_text(path, head, cfg.encoding)
    given = text_encoding.detect(path, opener) if cfg.encoding == text_encoding.AUTO and fmt != "parquet" else cfg.encoding
    encoding = text_encoding.reading_codec(given)
    sep = delimiter(cfg, fmt, path, opener, encoding) if fmt in ("csv", "tsv", "delimited") else None
    if fmt == "lines" or (fmt == "delimited" and sep is None):
        return read_lines(path, opener, encoding, cfg, split, tally)
    if streaming.should_stream(cfg, path):
        plain = compression.plain_file(path, Path(streaming.cfg_cache_dir()))
        frame = streaming.ArrowFrame(streaming.arrow_table(plain, cfg, fmt, sep, encoding, QUOTING[cfg.quoting]))
        sources.record(tally, sources.Count(split, path, len(frame)))
        return frame
    try:
        if fmt == "parquet":
            with opener() as f:
                frame = pd.read_parquet(f)
        elif fmt == "jsonl":
            frame = read_jsonl(path, opener, encoding)
        else:
            frame, bad = read_delimited(opener, path, cfg, sep, encoding)
    except UnicodeDecodeError as err:
        raise text_encoding.not_decodable(path, given, opener) from err
    except (pd.errors.ParserError, ValueError) as err:
        raise DataError(parser_advice(path, str(err))) from err
    if not cfg.header and fmt in ("parquet", "jsonl") and not all(isinstance(c, int) for c in frame.columns):
        raise DataError(f"data.header=false applies to csv/tsv files (and jsonl rows that are lists); {path} names "
                        f"its columns: {list(frame.columns)}. Drop data.header=false")
    if cfg.columns:
        if len(cfg.columns) != len(frame.columns):
            raise DataError(f"{path}: data.columns names {len(cfg.columns)} columns ({list(cfg.columns)}) but the file "
                            f"has {len(frame.columns)}" + ("" if cfg.header or len(frame.columns) > 1 else
                                                           "; all in one: set data.delimiter"))
        frame.columns = list(cfg.columns)
    if fmt in ("csv", "tsv", "delimited"):
        check_stray_quotes(frame, sep, path, cfg.quoting)
    if frame.empty:
        raise DataError(f"data.{split}: {path} has a header but no rows")
    skipped = {"blank lines": blank_lines(opener)} if fmt != "parquet" else {}
    if fmt in ("csv", "tsv", "delimited") and bad:
        skipped[f"lines with too many fields ({'cut' if cfg.bad_lines == 'truncate' else 'skipped'}, data.bad_lines)"] = bad
    sources.record(tally, sources.Count(split, path, len(frame), {k: v for k, v in skipped.items() if v}))
    return frame


def read_lines(path: str, opener, encoding: str, cfg: DataConfig, split: str, tally) -> pd.DataFrame:
    """One example per line: the text is the line without its line end. Only \\n and \\r\\n end a line (U+0085,
    U+2028 and form feeds are text, unlike str.splitlines); blank lines are skipped and counted. Above
    data.streaming_above_mb (or with data.streaming=true) the lines stay on disk (runner.streaming)."""
    import codecs

    import pyarrow as pa

    text_name, label_name = sources.columns(cfg)
    if cfg.type != DataType.single:
        raise DataError(f"{path} has one example per line (one text): that is data.type=single, not {cfg.type.value}")
    decoder = codecs.getincrementaldecoder(encoding)()
    names = [text_name, sources.LINE_COLUMN]
    writer = streaming.BatchWriter(names, {sources.LINE_COLUMN: pa.int64()}) if streaming.should_stream(cfg, path) else None
    kept, numbers, blank, carry, number = [], [], 0, "", 0
    try:
        with opener() as f:
            while True:
                chunk = f.read(1 << 22)
                lines = (carry + decoder.decode(chunk, final=not chunk)).split("\n")
                carry = lines.pop() if chunk else ""
                for line in lines:
                    number += 1
                    line = line.removesuffix("\r")
                    if line.strip():
                        kept.append(line)
                        numbers.append(number)
                    else:
                        blank += 1
                if writer is not None:
                    writer.write([kept, numbers])
                    kept, numbers = [], []
                if not chunk:
                    break
    except UnicodeDecodeError as err:
        raise text_encoding.not_decodable(path, encoding.removesuffix("-sig"), opener) from err
    blank -= 1 if not lines or lines[-1] == "" else 0  # the line end of the last line opens no line of its own
    frame = (streaming.ArrowFrame(writer.finish()) if writer is not None
             else pd.DataFrame({text_name: kept, sources.LINE_COLUMN: numbers}))
    frame.attrs[sources.UNLABELLED] = (f"no column {label_name!r}: one example per line carries no label; give labels "
                                       f"by source, data.train={{pos: pos.txt, neg: neg.txt}}")
    if len(frame) == 0:
        raise DataError(f"data.{split}: {path} has no line with text")
    sources.record(tally, sources.Count(split, f"{path} (one example per line)", len(frame),
                                        {"blank lines": blank} if blank else {}))
    return frame


def read_delimited(opener, path: str, cfg: DataConfig, sep: str, encoding: str) -> tuple[pd.DataFrame, int]:
    """csv/tsv through pandas; lines with too many fields fail, or are skipped or cut (data.bad_lines), counted.
    Returns the frame and how many lines were skipped or cut."""
    # Always headerless to pandas: with a header, a first data row longer than the header would silently
    # become an index (or be cut); read raw, every line is held to the first line's width.
    options = dict(sep=sep, quoting=QUOTING[cfg.quoting], encoding=encoding, dtype=str, keep_default_na=False,
                   na_values=[], header=None)
    if cfg.bad_lines == "truncate":  # keep the first fields of a long line (the python engine takes a callable)
        with opener() as f:
            width, cut = len(pd.read_csv(f, nrows=1, **options).columns), []

        def first_fields(fields: list[str]) -> list[str]:
            cut.append(len(fields))
            return fields[:width]

        with opener() as f:
            frame = pd.read_csv(f, engine="python", on_bad_lines=first_fields, **options)
        count, how = len(cut), "cut to their first fields"
    else:
        with warnings.catch_warnings(record=True) as caught, opener() as f:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            frame = pd.read_csv(f, on_bad_lines="warn" if cfg.bad_lines == "skip" else "error", **options)
        count, how = sum(str(w.message).count("Skipping line") for w in caught), "skipped"
    if count:
        log.warning("%s: %d lines with more fields than the first line %s (data.bad_lines=%s)", path, count, how,
                    cfg.bad_lines)
    if cfg.header:
        frame.columns = frame.iloc[0].tolist()
        frame = frame.iloc[1:].reset_index(drop=True)
    return frame, count


def parser_advice(path: str, error: str) -> str:
    """The parser's complaint, and the option that fixes it."""
    extra = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", error)
    if extra:
        return (f"{path}: line {extra[2]} has {extra[3]} fields where the first has {extra[1]}: set data.bad_lines=skip "
                f"(drop such lines) or truncate (keep their first fields), counted in the log; or check data.delimiter and data.quoting")
    quote = re.search(r"EOF inside string starting at row (\d+)", error)
    if quote:
        return (f"{path}: a quote character near row {quote[1]} opens a field that never closes (a stray quote in "
                f"raw text): set data.quoting=none to read quote characters as text")
    return (f"{path}: cannot be parsed: {error.strip()}. Check data.delimiter and data.quoting (data.quoting=none "
            f"when fields contain raw quote characters)")


def delimiter(cfg: DataConfig, fmt: str, path: str, opener, encoding: str) -> str | None:
    """data.delimiter (a character or a name such as semicolon/tab), the format's own, or sniffed and logged;
    None for a file of another extension (.txt) whose lines are not a table: one example per line."""
    if cfg.delimiter:
        sep = DELIMITERS.get(cfg.delimiter.lower(), cfg.delimiter)
        if len(sep) != 1:
            raise DataError(f"data.delimiter={cfg.delimiter!r}: give one character or one of {list(DELIMITERS)[:5]}")
        return sep
    if fmt != "delimited":
        return "\t" if fmt == "tsv" else ","
    with opener() as f:
        sample = f.read(65536).decode(encoding, errors="replace")
    sep = table_delimiter(sample, cfg)
    if sep is None:
        log.info("%s: no delimiter separates its lines into the same number of columns: one example per line "
                 "(data.format=lines; set data.delimiter if it is a table)", path)
        return None
    name = next(k for k, v in DELIMITERS.items() if v == sep)
    log.info("%s: no data.delimiter given and the extension does not say: it looks %s-separated "
             "(data.delimiter=%s)", path, name, name)
    return sep


def table_delimiter(sample: str, cfg: DataConfig) -> str | None:
    """The delimiter that splits the sample's first lines (up to 50) into the same number (2 or more) of fields,
    or whose split of the first line names the configured text or label column; None: not a table."""
    lines = [line.removesuffix("\r") for line in sample.split("\n")[:-1] if line.strip()][:50] or [sample]
    wanted = {str(f) for f in (cfg.text_field, cfg.label_field) if isinstance(f, str)}
    consistent = []
    for sep in ("\t", ",", ";", "|"):
        try:
            widths = {len(row) for row in csv.reader(lines, delimiter=sep, quoting=QUOTING[cfg.quoting])}
            first = next(csv.reader(lines[:1], delimiter=sep, quoting=QUOTING[cfg.quoting]), [])
        except csv.Error:  # a lone carriage return inside a line: not a csv row
            continue
        if cfg.header and len(first) > 1 and wanted & {c.strip() for c in first}:
            return sep
        if len(widths) == 1 and widths.pop() > 1:
            consistent.append(sep)
    if len(consistent) > 1:
        try:
            sniffed = csv.Sniffer().sniff(sample, delimiters="".join(consistent)).delimiter
            return sniffed if sniffed in consistent else consistent[0]
        except csv.Error:
            return consistent[0]
    return consistent[0] if consistent else None


def read_jsonl(path: str, opener, encoding: str) -> pd.DataFrame:
    """One JSON object (or list: a headerless row) per line; blank lines skipped; a bad line is named."""
    import io

    rows = []
    with opener() as raw, io.TextIOWrapper(raw, encoding=encoding, newline="") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {number} is not JSON ({err.msg}, column {err.colno})") from err
    kinds = {type(r) for r in rows}
    if kinds - {dict} and kinds - {list}:
        raise DataError(f"{path}: every line must be a JSON object (or every line a list); found {sorted(k.__name__ for k in kinds)}")
    return pd.DataFrame(rows)


def check_stray_quotes(frame: pd.DataFrame, sep: str, path: str, quoting: str) -> None:
    """A quote that opens a field and never closes on its line swallows the lines after it into one cell
    (raw SMS or tweets). A quoted cell spanning lines that each look like a row of their own is that."""
    if quoting == "none":
        return
    for column in frame.columns:
        values = frame[column]
        multiline = values[values.str.contains("\n", regex=False)]
        for row, cell in multiline.items():
            lines = cell.split("\n")[1:]
            if sum(sep in line for line in lines) >= max(1, len(lines) // 2):
                raise DataError(f"{path}: row {int(row) + 1}, column {column!r} runs over {len(lines) + 1} lines that look like "
                                f"rows of their own ({cell[:60]!r}...): a stray quote character in the text opened a "
                                f"quoted field. Set data.quoting=none to read quote characters as text")


def blank_lines(opener) -> int:
    """How many blank lines the reader skipped (reported in the log and data_sources.json)."""
    with opener() as f:
        return sum(1 for line in f if not line.strip())


def read_hub_split(cfg: DataConfig, split: str) -> pd.DataFrame:
    import datasets

    try:
        loaded = datasets.load_dataset(cfg.hub, cfg.hub_config, split=split, revision=cfg.revision)
    except Exception as err:  # network, unknown split, offline mode: one message, not a traceback
        raise DataError(
            f"could not load split {split!r} of hub dataset {cfg.hub!r}: {str(err).strip().splitlines()[0]}. "
            f"Offline? Use local files: data=csv data.train=... data.validation=..."
        ) from err
    return sources.embedded_images(cfg, loaded.data.table).to_pandas()  # images stored inside: as files in the cache


def split_labels(value, separator: str) -> list[str]:
    """Several labels in one cell: a list (jsonl/parquet) or a separated string ("sports,news")."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v).strip() for v in value]
    return [part.strip() for part in str(value).split(separator) if part.strip()]


def label_map(labels: pd.Series, target: str, separator: str) -> list:
    """Sorted distinct labels; all-integer labels (e.g. "0"/"1" in a csv) become ints. Surrounding spaces
    are not part of a label (" pos" is "pos"), here and when rows are encoded."""
    if target == "multi_label":
        values = [v for cell in labels.tolist() for v in split_labels(cell, separator)]
    else:
        values = class_counts(labels).index.tolist()  # the distinct labels: millions of rows, a few values
    try:
        as_int = [int(v) for v in values]
        if all(str(v).strip() == str(i) for v, i in zip(values, as_int)):
            return sorted(set(as_int))
    except (TypeError, ValueError):
        pass
    return sorted({str(v) for v in values})


def encode_targets(labels: pd.Series, target: str, names: list, split: str, cfg: DataConfig,
                   score_range: list[float] | None = None) -> np.ndarray:
    """Class ids (int64), scores (float32) or multi-hot rows (float32), with the row of any bad value."""
    where = sources.describe(getattr(cfg, split))
    if target == "class":
        return encode_classes(labels, names, where, cfg)
    if target == "score":
        return encode_scores(labels, where, cfg, score_range)
    index = {str(name): i for i, name in enumerate(names)}
    out = np.zeros((len(labels), len(names)), dtype=np.float32)
    for row, value in enumerate(labels.tolist()):
        keys = split_labels(value, cfg.label_separator)
        unknown = [k for k in keys if k not in index]
        if unknown:
            bad_label(where, row, cfg, f"label {unknown[0]!r} does not occur in the training data (known labels: {names})")
        out[row, [index[k] for k in keys]] = 1.0
    return out


def bad_label(where: str, row: int, cfg: DataConfig, problem: str):
    raise DataError(f"{where}: row {row_number(row, where)}, column {cfg.label_field!r}: {problem}")


def encode_classes(labels: pd.Series, names: list, where: str, cfg: DataConfig) -> np.ndarray:
    """Class ids through the labels' categories: a lookup per distinct label, not per row."""
    categorical = labels.astype("category").reset_index(drop=True)
    index = {str(name): i for i, name in enumerate(names)}
    categories = categorical.cat.categories.tolist()
    lookup = np.array([index.get(str(c).strip(), -1) for c in categories] + [-1], dtype=np.int64)
    codes = categorical.cat.codes.to_numpy()  # -1 for a missing value: the lookup's last entry
    out = lookup[codes]
    if (out < 0).any():
        row = int(np.flatnonzero(out < 0)[0])
        value = categories[codes[row]] if codes[row] >= 0 else None
        bad_label(where, row, cfg, f"label {str(value).strip()!r} does not occur in the training data (known labels: {names})")
    return out


def encode_scores(labels: pd.Series, where: str, cfg: DataConfig, score_range) -> np.ndarray:
    """Float scores, checked column-wise: numbers, finite, within task.score_range."""
    labels = labels.reset_index(drop=True)
    if isinstance(labels.dtype, pd.CategoricalDtype):  # a column on disk (runner.streaming): convert each value once
        values = pd.to_numeric(pd.Series(labels.cat.categories), errors="coerce").to_numpy(dtype=np.float64)
        scores = np.append(values, np.nan)[labels.cat.codes.to_numpy()]
    else:
        scores = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(np.isnan(scores))
    if len(bad):
        bad_label(where, int(bad[0]), cfg, f"score {labels.iloc[int(bad[0])]!r} is not a number")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        bad_label(where, int(bad[0]), cfg, f"score {labels.iloc[int(bad[0])]!r} is not a finite number")
    if score_range:
        bad = np.flatnonzero((scores < score_range[0]) | (scores > score_range[1]))
        if len(bad):
            bad_label(where, int(bad[0]), cfg, f"score {scores[bad[0]]:g} is outside task.score_range="
                                               f"[{score_range[0]:g}, {score_range[1]:g}]")
    return scores.astype(np.float32)


def split_off_validation(train: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """A seeded split of train, stratified by label when every class has at least two examples. Above
    BIG_SPLIT rows, each class's share is drawn by NumPy: scikit-learn's stratified split holds several
    copies of the row index, gigabytes for tens of millions of rows."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DataError(f"no validation data: set data.validation or data.validation_split in (0, 1), not {fraction}")
    stratify = None
    if train.labels is not None and train.labels.ndim == 1 and train.labels.dtype.kind == "i":
        counts = np.bincount(train.labels)
        stratify = train.labels if counts[counts > 0].min() >= 2 else None
    if len(train) > BIG_SPLIT:
        held = np.sort(drawn_rows(stratify, len(train), fraction, seed))
        keep = np.ones(len(train), dtype=bool)
        keep[held] = False
        return train.subset(np.flatnonzero(keep)), train.subset(held)
    keep, held = train_test_split(
        np.arange(len(train)), test_size=fraction, random_state=seed, stratify=stratify
    )
    return train.subset(np.sort(keep)), train.subset(np.sort(held))


BIG_SPLIT = 2_000_000


def drawn_rows(labels: np.ndarray | None, rows: int, fraction: float, seed: int) -> np.ndarray:
    """``fraction`` of the rows (of each class when ``labels`` is given), drawn without replacement."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return rng.choice(rows, size=max(1, round(rows * fraction)), replace=False)
    order = np.argsort(labels, kind="stable")  # the rows of each class, together
    bounds = np.cumsum(np.bincount(labels))
    parts = [rng.choice(order[start:end], size=max(1, round((end - start) * fraction)), replace=False)
             for start, end in zip(np.concatenate([[0], bounds[:-1]]), bounds) if end > start]
    return np.concatenate(parts)


def reading_config(folder: Path, meta: dict, input_path, overrides: dict) -> DataConfig:
    """The training run's data reading options (its config.yaml), the input as data.train (a file, a folder or
    a mapping label -> source), user overrides."""
    from omegaconf import OmegaConf

    from runner import trust

    saved = trust.read_saved_config(folder).get("data") or {}
    if not isinstance(saved, dict):
        raise DataError(f"{folder}/config.yaml: data is not a mapping of reading options")
    keep = {k: v for k, v in saved.items()
            if k not in ("train", "validation", "test", "hub", "split_field", "split_values", "max_train_samples",
                         "train_embeddings", "validation_embeddings", "test_embeddings", "label_names")}
    from omegaconf.errors import OmegaConfBaseException

    try:
        saved_options = OmegaConf.merge(OmegaConf.structured(DataConfig), keep)
    except (OmegaConfBaseException, ValueError) as err:
        raise DataError(f"{folder}/config.yaml: its data options are not valid ({str(err).splitlines()[0]})") from err
    return OmegaConf.to_object(OmegaConf.merge(saved_options, overrides, {"train": input_path}))
