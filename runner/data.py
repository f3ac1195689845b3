"""Reading labelled text from local files or the hub, with errors that name file, row and column.

Local files: csv, tsv, jsonl, parquet (format from the extension unless ``data.format`` is set).
Hub datasets: ``data.hub`` names the dataset and ``data.train`` / ``validation`` / ``test`` its splits;
a value that is an existing file wins over a split name, so a hub config also takes local paths.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from runner.errors import DataError
from runner.schema import DataConfig

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
QUOTING = {"minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL, "nonnumeric": csv.QUOTE_NONNUMERIC, "none": csv.QUOTE_NONE}


@dataclass
class TextSplit:
    """One split of single-text classification data: texts and integer label ids."""

    texts: list[str]
    labels: np.ndarray  # int64 ids into the label map

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> TextSplit:
        return TextSplit([self.texts[i] for i in index], self.labels[index])


@dataclass
class Dataset:
    train: TextSplit
    validation: TextSplit | None  # None only when asked not to split one off (k-fold makes its own)
    test: TextSplit | None
    label_names: list  # id -> original label (str or int), saved with the model


def load_dataset(cfg: DataConfig, need_validation: bool = True) -> Dataset:
    """Read, check and label-encode the configured splits.

    Without a validation file, a stratified part of train becomes validation, unless ``need_validation``
    is false (k-fold: the held-out folds validate, and a validation file is not read).
    """
    if not cfg.train:
        raise DataError("data.train is not set: give a file path (data=csv data.train=path/to/train.csv)")
    train = read_split(cfg, "train")
    if cfg.max_train_samples:
        train = train.iloc[: cfg.max_train_samples]
    validation = read_split(cfg, "validation") if cfg.validation and need_validation else None
    test = read_split(cfg, "test") if cfg.test else None

    label_names = label_map(train[cfg.label_field])
    encode = lambda df, split: TextSplit(  # noqa: E731
        df[cfg.text_field].tolist(), encode_labels(df[cfg.label_field], label_names, split, cfg)
    )
    train_split = encode(train, "train")
    if validation is not None:
        val_split = encode(validation, "validation")
    elif need_validation:
        train_split, val_split = split_off_validation(train_split, cfg.validation_split, cfg.seed)
    else:
        val_split = None
    test_split = encode(test, "test") if test is not None else None
    return Dataset(train_split, val_split, test_split, label_names)


def read_split(cfg: DataConfig, split: str) -> pd.DataFrame:
    """One split as a DataFrame with checked text and label columns (blank texts and labels rejected)."""
    source = getattr(cfg, split)
    if os.path.exists(source) or not cfg.hub:
        frame, where = read_table(source, cfg, split), source
    else:
        frame, where = read_hub_split(cfg, source), f"{cfg.hub} [{source}]"
    columns = [cfg.text_field, cfg.label_field]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: no column {missing[0]!r} (data.{'text' if missing[0] == cfg.text_field else 'label'}_field); "
            f"the file has columns {list(frame.columns)}. Set data.text_field / data.label_field, or "
            f"data.delimiter if the columns were not split."
        )
    frame = frame[columns].reset_index(drop=True)
    for column in columns:
        blank = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0])
            raise DataError(f"{where}: row {row_number(row, where)}, column {column!r} is empty")
    frame[cfg.text_field] = frame[cfg.text_field].astype(str)
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
        raise DataError(
            f"{path}: not valid {cfg.encoding} text at byte {err.start}; set data.encoding (e.g. latin-1)"
        ) from err
    except (pd.errors.ParserError, ValueError) as err:
        raise DataError(
            f"{path}: cannot be read as {fmt}: {str(err).strip()}. Check data.delimiter and data.quoting "
            f"(data.quoting=none when fields contain raw quote characters)"
        ) from err
    if frame.empty:
        raise DataError(f"data.{split}: {path} has a header but no rows")
    return frame


def read_hub_split(cfg: DataConfig, split: str) -> pd.DataFrame:
    import datasets

    try:
        return datasets.load_dataset(cfg.hub, cfg.hub_config, split=split).to_pandas()
    except Exception as err:  # network, unknown split, offline mode: one message, not a traceback
        raise DataError(
            f"could not load split {split!r} of hub dataset {cfg.hub!r}: {str(err).strip().splitlines()[0]}. "
            f"Offline? Use local files: data=csv data.train=... data.validation=..."
        ) from err


def label_map(labels: pd.Series) -> list:
    """Sorted distinct labels; all-integer labels (e.g. "0"/"1" in a csv) become ints."""
    values = labels.tolist()
    try:
        as_int = [int(v) for v in values]
        if all(str(v).strip() == str(i) for v, i in zip(values, as_int)):
            return sorted(set(as_int))
    except (TypeError, ValueError):
        pass
    return sorted({str(v) for v in values})


def encode_labels(labels: pd.Series, names: list, split: str, cfg: DataConfig) -> np.ndarray:
    index = {str(name): i for i, name in enumerate(names)}
    ids = np.empty(len(labels), dtype=np.int64)
    for row, value in enumerate(labels.tolist()):
        key = str(value).strip()
        if key not in index:
            raise DataError(
                f"{getattr(cfg, split)}: row {row_number(row, getattr(cfg, split))}, column {cfg.label_field!r}: "
                f"label {value!r} does not occur in the "
                f"training data (known labels: {names})"
            )
        ids[row] = index[key]
    return ids


def split_off_validation(train: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """A seeded split of train, stratified by label when every class has at least two examples."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DataError(f"no validation data: set data.validation or data.validation_split in (0, 1), not {fraction}")
    counts = np.bincount(train.labels)
    stratify = train.labels if counts[counts > 0].min() >= 2 else None
    keep, held = train_test_split(
        np.arange(len(train)), test_size=fraction, random_state=seed, stratify=stratify
    )
    return train.subset(np.sort(keep)), train.subset(np.sort(held))
