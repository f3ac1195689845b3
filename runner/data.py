"""Reading labelled text from local files or the hub, with errors that name file, row and column.

Local files: csv, tsv, jsonl, parquet (format from the extension unless ``data.format`` is set).
Hub datasets: ``data.hub`` names the dataset and ``data.train`` / ``validation`` / ``test`` its splits;
a value that is an existing file wins over a split name, so a hub config also takes local paths.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from runner.errors import DataError
from runner.schema import DataConfig, DataType

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
log = logging.getLogger("runner")
FIELD_KEYS = {DataType.single: "text_field", DataType.pair: "text_fields", DataType.triplet: "anchor_field/positive_field/negative_field"}
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
        return TextSplit([[col[i] for i in index] for col in self.columns], labels, vectors)


@dataclass
class Dataset:
    train: TextSplit
    validation: TextSplit | None  # None only when asked not to split one off (k-fold makes its own)
    test: TextSplit | None
    label_names: list  # id -> original label (str or int), saved with the model; [] for scores/triplets


def text_fields(cfg: DataConfig) -> list[str]:
    """The text columns of the configured data type, in model order."""
    by_type = {
        DataType.single: [cfg.text_field],
        DataType.pair: list(cfg.text_fields),
        DataType.triplet: [f for f in (cfg.anchor_field, cfg.positive_field, cfg.negative_field) if f],
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
    read = lambda split: read_split(cfg, split, fields, label, raw)  # noqa: E731
    train = read("train")
    if cfg.max_train_samples:
        train = train.iloc[: cfg.max_train_samples]
    validation = read("validation") if given(cfg, "validation") and need_validation else None
    test = read("test") if given(cfg, "test") else None

    label_names = label_map(train[label], target, cfg.label_separator) if target in ("class", "multi_label") else []
    if target == "class" and len(label_names) < 2:
        first = f"its first {cfg.max_train_samples} rows (data.max_train_samples) have" if cfg.max_train_samples else "has"
        raise DataError(f"data.train {cfg.train}: {first} a single class ({label_names[0]!r} in column "
                        f"{cfg.label_field!r}): a classifier needs at least two; check data.label_field")

    def encode(df: pd.DataFrame, split: str) -> TextSplit:
        targets = None if label is None else encode_targets(df[label], target, label_names, split, cfg, score_range)
        vectors = read_vectors(cfg, df, split) if vector_input else None
        return TextSplit([df[f].tolist() for f in fields], targets, vectors)

    train_split = encode(train, "train")
    if validation is not None:
        val_split = encode(validation, "validation")
    elif need_validation:
        train_split, val_split = split_off_validation(train_split, cfg.validation_split, cfg.seed)
    else:
        val_split = None
    test_split = encode(test, "test") if test is not None else None
    return Dataset(train_split, val_split, test_split, label_names)


def given(cfg: DataConfig, split: str) -> bool:
    """Whether a validation/test split is configured. A hub preset's split name does not count once
    data.train is a local file (data=stsb data.train=train.csv): local train, local everything."""
    value = getattr(cfg, split)
    if not value:
        return False
    if cfg.hub and os.path.exists(cfg.train) and not os.path.exists(value):
        log.info("data.%s=%s is a hub split but data.train is a local file: not using it", split, value)
        return False
    return True


def read_vectors(cfg: DataConfig, frame: pd.DataFrame, split: str) -> np.ndarray:
    """The given embedding of every row of a split: (rows, dim) float32, all finite, one dimension."""
    if cfg.embedding_field:
        where, cells = getattr(cfg, split), frame[cfg.embedding_field].tolist()
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


def read_split(cfg: DataConfig, split: str, fields: list[str], label: str | None, raw: list[str] = ()) -> pd.DataFrame:
    """One split as a DataFrame with checked text and label columns (blank texts and labels rejected);
    ``raw`` columns (given embeddings) are checked to exist and kept as they are."""
    source = getattr(cfg, split)
    if os.path.exists(source) or not cfg.hub:
        frame, where = read_table(source, cfg, split), source
    else:
        frame, where = read_hub_split(cfg, source), f"{cfg.hub} [{source}]"
    columns = fields + ([label] if label else []) + list(raw)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        key = "label_field" if missing[0] == label else "embedding_field" if missing[0] in raw else FIELD_KEYS[cfg.type]
        raise DataError(
            f"{where}: no column {missing[0]!r} (data.{key}); the file has columns {list(frame.columns)}. "
            f"Set data.{key}, or data.delimiter if the columns were not split."
        )
    frame = frame[columns].reset_index(drop=True)
    for column in columns:
        values = frame[column]
        blank = values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0])
            raise DataError(f"{where}: row {row_number(row, where)}, column {column!r} is empty")
    for field in fields:
        frame[field] = frame[field].astype(str)
    return frame


def row_number(index: int, where: str) -> int:
    """1-based line number in the file as a user sees it (header line counted for csv/tsv)."""
    return index + 2 if Path(where).suffix.lower() in (".csv", ".tsv", ".txt") else index + 1


def read_table(path: str, cfg: DataConfig, split: str) -> pd.DataFrame:
    if not os.path.exists(path):
        raise DataError(f"data.{split}: file not found: {path} (relative paths start from {os.getcwd()})")
    if os.path.getsize(path) == 0:
        raise DataError(f"data.{split}: {path} is empty")
    fmt = cfg.format or FORMATS.get(Path(path).suffix.lower())
    if fmt not in ("csv", "tsv", "jsonl", "parquet"):
        raise DataError(f"data.{split}: cannot tell the format of {path}; set data.format=csv|tsv|jsonl|parquet")
    if cfg.quoting not in QUOTING:
        raise DataError(f"data.quoting={cfg.quoting!r} is not one of {list(QUOTING)}")
    try:
        if fmt == "parquet":
            frame = pd.read_parquet(path)
        elif fmt == "jsonl":
            frame = pd.read_json(path, lines=True, encoding=cfg.encoding, dtype=False)
        else:
            frame = pd.read_csv(
                path,
                sep=cfg.delimiter or ("\t" if fmt == "tsv" else ","),
                quoting=QUOTING[cfg.quoting],
                encoding=cfg.encoding,
                dtype=str,
                keep_default_na=False,
                na_values=[],
            )
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: line {undecodable_line(path, cfg.encoding)} is not valid {cfg.encoding} text; set "
                        f"data.encoding (e.g. latin-1)") from err
    except (pd.errors.ParserError, ValueError) as err:
        raise DataError(
            f"{path}: cannot be read as {fmt}: {str(err).strip()}. Check data.delimiter and data.quoting "
            f"(data.quoting=none when fields contain raw quote characters)"
        ) from err
    if frame.empty:
        raise DataError(f"data.{split}: {path} has a header but no rows")
    return frame


def undecodable_line(path: str, encoding: str) -> int | str:
    """The 1-based number of the first line that does not decode (the parser's offsets are per chunk)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError:
                return number
    return "?"


def read_hub_split(cfg: DataConfig, split: str) -> pd.DataFrame:
    import datasets

    try:
        return datasets.load_dataset(cfg.hub, cfg.hub_config, split=split).to_pandas()
    except Exception as err:  # network, unknown split, offline mode: one message, not a traceback
        raise DataError(
            f"could not load split {split!r} of hub dataset {cfg.hub!r}: {str(err).strip().splitlines()[0]}. "
            f"Offline? Use local files: data=csv data.train=... data.validation=..."
        ) from err


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
        values = [v.strip() if isinstance(v, str) else v for v in labels.tolist()]
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
    where = getattr(cfg, split)
    index = {str(name): i for i, name in enumerate(names)}
    values = labels.tolist()
    if target == "score":
        out = np.empty(len(values), dtype=np.float32)
    elif target == "multi_label":
        out = np.zeros((len(values), len(names)), dtype=np.float32)
    else:
        out = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        bad = None
        if target == "score":
            try:
                out[row] = score = float(value)
            except (TypeError, ValueError):
                bad = f"score {value!r} is not a number"
            else:
                if not np.isfinite(score):
                    bad = f"score {value!r} is not a finite number"
                elif score_range and not score_range[0] <= score <= score_range[1]:
                    bad = f"score {score:g} is outside task.score_range=[{score_range[0]:g}, {score_range[1]:g}]"
        else:
            keys = split_labels(value, cfg.label_separator) if target == "multi_label" else [str(value).strip()]
            unknown = [k for k in keys if k not in index]
            if unknown:
                bad = f"label {unknown[0]!r} does not occur in the training data (known labels: {names})"
            elif target == "multi_label":
                out[row, [index[k] for k in keys]] = 1.0
            else:
                out[row] = index[keys[0]]
        if bad:
            raise DataError(f"{where}: row {row_number(row, where)}, column {cfg.label_field!r}: {bad}")
    return out


def split_off_validation(train: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """A seeded split of train, stratified by label when every class has at least two examples."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DataError(f"no validation data: set data.validation or data.validation_split in (0, 1), not {fraction}")
    stratify = None
    if train.labels is not None and train.labels.ndim == 1 and train.labels.dtype.kind == "i":
        counts = np.bincount(train.labels)
        stratify = train.labels if counts[counts > 0].min() >= 2 else None
    keep, held = train_test_split(
        np.arange(len(train)), test_size=fraction, random_state=seed, stratify=stratify
    )
    return train.subset(np.sort(keep)), train.subset(np.sort(held))
