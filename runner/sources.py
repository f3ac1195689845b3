"""What a data source is, decided from what it is, read as one table with its counts.

A split (``data.train`` / ``validation`` / ``test``) is one of the layouts in :data:`LAYOUTS`, tried in order:

- a folder written by ``datasets``' ``save_to_disk``: ``dataset_dict.json`` (a DatasetDict: its splits) or
  ``state.json`` (one Dataset); its Arrow files are memory-mapped with pyarrow (never through ``datasets``,
  nothing in the folder is imported or unpickled), ClassLabel columns read as their names;
- a folder with ``train/`` (and ``test/``, ``validation/`` or ``dev/``) subfolders: splits;
- a folder of class subfolders, one file per example (any extension; hidden and empty files skipped and
  counted; files below a class folder's subfolders belong to it);
- a file: a table (csv, tsv, jsonl, parquet, .arrow) or one example per line, compressed or not
  (runner.data.read_table).

``data.train={pos: a.txt, neg: reviews/}`` gives each source's rows its label. Lines and files-as-examples
give a text column named by ``data.text_field`` and a label column named by ``data.label_field``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from runner import streaming, text_encoding
from runner.compression import MAGIC, decompress_bytes
from runner.errors import DataError

log = logging.getLogger("runner")
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
FILE_COLUMN = "file"  # the file each example of a folder came from (runner.predict writes it beside the prediction)
LINE_COLUMN = "line"  # the 1-based line of each example of a lines file (blank lines are skipped)
ORIGIN_COLUMNS = (FILE_COLUMN, LINE_COLUMN)
UNLABELLED = "unlabelled"  # frame.attrs key: why a layout's rows carry no label and how to give them one
BATCH = 4096  # files read per batch (a streamed folder writes each batch to disk)
MAX_JSON = 1 << 20  # a saved dataset's state.json / dataset_info.json is small: a bigger one is not read


@dataclass
class Count:
    """What one source gave: rows read, rows skipped by reason, rows per class (class folders, mappings)."""

    split: str
    source: str
    rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] | None = None

    def line(self) -> str:
        classes = f" ({', '.join(f'{k} {v:,}' for k, v in self.classes.items())})" if self.classes else ""
        skipped = f"; skipped {', '.join(f'{v:,} {k}' for k, v in self.skipped.items())}" if self.skipped else ""
        return f"data.{self.split}: {self.rows:,} rows read from {self.source}{classes}{skipped}"


class Tally(list):
    """The counts of one load, for the log and MLflow (runner.job writes them to data_sources.json)."""

    def add(self, count: Count) -> None:
        self.append(count)
        log.info(count.line())


def columns(cfg) -> tuple[str, str]:
    """The names a layout without column names gives its text and label: data.text_field / data.label_field."""
    text = cfg.text_field if isinstance(cfg.text_field, str) else "text"
    label = cfg.label_field if isinstance(cfg.label_field, str) else "label"
    return text, label


def describe(source) -> str:
    if isinstance(source, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in source.items()) + "}"
    return str(source)


# ---- layouts -------------------------------------------------------------------------------------------

def is_saved_dict(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json"))


def is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json"))


def split_folders(path: str) -> dict[str, str]:
    """split -> subfolder of a folder of split folders (train/ test/ dev/ ...), or {} when it is not one."""
    if not os.path.isdir(os.path.join(path, "train")):
        return {}
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if os.path.isdir(os.path.join(path, name)):
                found.setdefault(split, os.path.join(path, name))
    return found


def saved_splits(path: str) -> dict[str, str]:
    """split -> subfolder of a saved DatasetDict (its dataset_dict.json lists the splits)."""
    listed = read_small_json(os.path.join(path, "dataset_dict.json")).get("splits")
    if not isinstance(listed, list) or not all(isinstance(s, str) and s and os.path.basename(s) == s and s not in (".", "..")
                                               for s in listed):
        raise DataError(f"{path}/dataset_dict.json: 'splits' must list the names of subfolders of the folder, got {listed!r}")
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if name in listed:
                found.setdefault(split, os.path.join(path, name))
    for name in listed:  # other split names stay reachable as data.test=<folder>/<name>
        found.setdefault(name, os.path.join(path, name))
    return found


def splits_of(path) -> dict[str, str]:
    """The splits a folder holds (a saved DatasetDict or train/ test/ subfolders), {} for anything else."""
    if not isinstance(path, str) or not os.path.isdir(path):
        return {}
    return saved_splits(path) if is_saved_dict(path) else split_folders(path)


def split_sources(cfg) -> dict[str, object]:
    """split -> source for this job: the configured ones, and those of a folder of splits given as data.train
    (data.validation / data.test set explicitly win). A local folder as data.hub: train/validation/test name
    its splits."""
    given = {s: getattr(cfg, s) for s in ("train", "validation", "test") if getattr(cfg, s)}
    train = given.get("train")
    if cfg.hub and not os.path.isdir(cfg.hub) and isinstance(train, str) and os.path.exists(train):
        for split in ("validation", "test"):  # data=stsb data.train=train.csv: local train, local everything
            if isinstance(given.get(split), str) and not os.path.exists(given[split]):
                log.info("data.%s=%s is a hub split but data.train is a local file: not using it", split, given.pop(split))
    if cfg.hub and os.path.isdir(cfg.hub):
        names = {os.path.basename(p) for p in (splits_of(cfg.hub) or {}).values()}
        unknown = [v for v in given.values() if isinstance(v, str) and v not in names and not os.path.exists(v)]
        if unknown:
            raise DataError(f"data.hub={cfg.hub}: no split {unknown[0]!r}; it holds {sorted(names)}")
        # a split name of the folder first (a folder named "train" in the working directory does not win)
        return {s: os.path.join(cfg.hub, v) if isinstance(v, str) and v in names else v for s, v in given.items()}
    inner = splits_of(given.get("train"))
    if not inner:
        return given
    if "train" not in inner:
        raise DataError(f"data.train={given['train']} holds the splits {sorted(inner)} but no train split: give "
                        f"data.train=<the folder of the training split>")
    taken = [s for s in ("validation", "test") if s in inner and s not in given]
    log.info("data.train=%s holds splits: train from %s%s", given["train"], inner["train"],
             "".join(f", {s} from {inner[s]}" for s in taken))
    return {**given, "train": inner["train"], **{s: inner[s] for s in taken}}


# ---- files as examples (class folders, a folder given a label) ----------------------------------------------

SYSTEM_FILES = {"__MACOSX", "Thumbs.db", "desktop.ini", "ehthumbs.db"}  # what file managers leave in folders


def hidden(name: str) -> bool:
    """Dot files and folders, Office lock files (~$...) and the files file managers leave: not examples."""
    return name.startswith((".", "~$")) or name in SYSTEM_FILES


def walk_files(folder: str, hidden_files: list[int] | None = None) -> Iterator[str]:
    """Every non-hidden file below ``folder`` (hidden folders are not entered), in sorted order; hidden files
    (and the files of hidden folders) are counted in ``hidden_files[0]``."""
    with os.scandir(folder) as entries:
        listed = sorted((e.name, e.is_dir(), e.path) for e in entries)
    for name, is_dir, path in listed:
        if hidden(name):
            if hidden_files is not None:
                hidden_files[0] += sum(len(files) for _, _, files in os.walk(path)) if is_dir else 1
        elif is_dir:
            yield from walk_files(path, hidden_files)
        else:
            yield path


def read_bytes(path: str) -> bytes:
    """A whole file through the system calls themselves: on a small file, building a Python file object costs
    more than reading it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(fd, 1 << 16)]
        while parts[-1]:
            parts.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return b"".join(parts)


FIRST_BYTES = {magic[:1] for magic in MAGIC}  # a file's first byte decides whether to look for a signature


def file_texts(paths: list[str], encoding: str, skipped: dict[str, int]) -> list[tuple[int, str]]:
    """(position in ``paths``, text) of every file that holds text; empty and whitespace-only files counted in
    ``skipped``. One plain loop: on small files the open/read calls are the cost, and threads only add
    contention for the interpreter. With data.encoding=auto, the files that are not UTF-8 are read in the one
    encoding detected from them together."""
    auto = encoding == text_encoding.AUTO
    codec = text_encoding.reading_codec("utf-8" if auto else encoding)
    utf8 = codec == "utf-8-sig"  # decoded as utf-8 and a byte-order mark dropped: the C codec, not utf_8_sig's
    wide = codec.startswith(("utf-16", "utf-32"))
    out, undecoded = [], []
    for position, path in enumerate(paths):
        data = read_bytes(path)
        if not data:
            skipped["empty files"] = skipped.get("empty files", 0) + 1
            continue
        if data[:1] in FIRST_BYTES:
            data = decompress_bytes(data)
        if not wide and b"\0" in data:
            raise DataError(f"{path} holds NUL bytes: a binary file, not text. Move it out of the folder (hidden "
                            f"files, named .*, are skipped)")
        try:
            text = data.decode("utf-8") if utf8 else data.decode(codec)
            if utf8 and text[:1] == "\ufeff":
                text = text[1:]
        except UnicodeDecodeError:
            if not auto:
                text_encoding.decode(data, encoding, path)  # raises with the offset, line and likely encoding
            undecoded.append((position, path, data))
            continue
        keep(out, position, text, skipped)
    if undecoded:
        sample = b"\n".join(data for _, _, data in undecoded)[: 1 << 20]
        guessed, confidence = text_encoding.guess(sample)
        log.info("%d files are not UTF-8 (first: %s); read as %s (data.encoding=auto, confidence %.2f)",
                 len(undecoded), undecoded[0][1], guessed, confidence)
        for position, path, data in undecoded:
            keep(out, position, text_encoding.decode(data, guessed, path), skipped)
        out.sort(key=lambda item: item[0])
    return out


def keep(out: list, position: int, text: str, skipped: dict[str, int]) -> None:
    if text[-1:] == "\n":  # a file's last line end is not part of its text
        text = text[:-2] if text[-2:] == "\r\n" else text[:-1]
    if not text or (text[0].isspace() and not text.strip()):
        skipped["blank files"] = skipped.get("blank files", 0) + 1
    else:
        out.append((position, text))


def class_files(folder: str, classes: list | None) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(class, path) of every example of a class folder, and what is skipped (files beside the class folders,
    classes not in data.classes, hidden files)."""
    with os.scandir(folder) as entries:
        listed = sorted((e.name, e.is_dir()) for e in entries if not hidden(e.name))
    found = [name for name, is_dir in listed if is_dir]
    loose = [name for name, is_dir in listed if not is_dir]
    if not found:
        return [], {}
    wanted = found if classes is None else [str(c) for c in classes]
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"data.classes: {folder} has no class folder {missing[0]!r}; its class folders are {found}")
    skipped: dict[str, int] = {}
    if loose:
        skipped["files beside the class folders"] = len(loose)
    others = [c for c in found if c not in wanted]
    if others:
        skipped[f"files of classes not in data.classes ({', '.join(others)})"] = sum(
            1 for c in others for _ in walk_files(os.path.join(folder, c)))
    hidden_files = [sum(hidden(e) for e in os.listdir(folder) if os.path.isfile(os.path.join(folder, e)))]
    labelled = [(c, p) for c in wanted for p in walk_files(os.path.join(folder, c), hidden_files)]
    if hidden_files[0]:
        skipped["hidden files"] = hidden_files[0]
    return labelled, skipped


def read_examples(cfg, labelled: list[tuple[str, str]], split: str, where: str) -> tuple[object, dict, dict]:
    """The frame of files-as-examples ``labelled`` ((label, path), in order): a DataFrame, or the Arrow table of
    runner.streaming once the texts exceed data.streaming_above_mb (or data.streaming=true). Returns (frame,
    skipped, rows per label)."""
    text_name, label_name = columns(cfg)
    skipped: dict[str, int] = {}
    per_label: dict[str, int] = {}
    names = [text_name, label_name, FILE_COLUMN]
    writer = streaming.BatchWriter(names) if cfg.streaming else None
    texts, labels, files, size = [], [], [], 0
    for start in range(0, len(labelled), BATCH):
        part = labelled[start:start + BATCH]
        for position, text in file_texts([p for _, p in part], cfg.encoding, skipped):
            texts.append(text)
            labels.append(part[position][0])
            files.append(part[position][1])
            size += len(text)
        if writer is None and cfg.streaming is None and size > cfg.streaming_above_mb * 2**20:
            writer = streaming.BatchWriter(names)
            log.info("%s: texts above data.streaming_above_mb=%d: kept on disk (runner.streaming)", where,
                     cfg.streaming_above_mb)
        if writer is not None:
            per_label.update(count_labels(labels, per_label))
            writer.write([texts, labels, files])
            texts, labels, files = [], [], []
    per_label.update(count_labels(labels, per_label))
    if writer is not None:
        frame = streaming.ArrowFrame(writer.finish())
    else:
        frame = pd.DataFrame({text_name: texts, label_name: labels, FILE_COLUMN: files})
    if len(frame) == 0:
        raise DataError(f"data.{split}: {where} has no file with text (skipped: {skipped or 'nothing'})")
    return frame, skipped, per_label


def count_labels(labels: list[str], counts: dict[str, int]) -> dict[str, int]:
    out = dict(counts)
    for label, n in pd.Series(labels, dtype=object).value_counts(sort=False).items():
        out[label] = out.get(label, 0) + int(n)
    return dict(sorted(out.items()))


def folder_examples(cfg, folder: str, label: str, split: str):
    """Every file below ``folder`` as one example labelled ``label``: (frame, what was skipped)."""
    hidden_files = [0]
    paths = list(walk_files(folder, hidden_files))
    frame, skipped, _ = read_examples(cfg, [(label, p) for p in paths], split, folder)
    return frame, {**({"hidden files": hidden_files[0]} if hidden_files[0] else {}), **skipped}


def read_class_folder(cfg, folder: str, split: str, tally: Tally | None):
    if cfg.type.value != "single":
        raise DataError(f"data.{split}={folder} is a folder of class folders (one text per file): that is data.type="
                        f"single, not {cfg.type.value}")
    labelled, skipped = class_files(folder, cfg.classes)
    if not labelled and not any(os.scandir(folder)):
        raise DataError(f"data.{split}={folder} is an empty folder")
    if not labelled:  # a folder of files without class folders: examples without labels (what predict reads)
        if cfg.classes is not None:
            raise DataError(f"data.classes: {folder} has no class folders (subfolders); it holds files only")
        frame, skipped = folder_examples(cfg, folder, "", split)
        record(tally, Count(split, f"{folder} (files without class folders: no labels)", len(frame), skipped))
        frame = without(frame, columns(cfg)[1])
        frame.attrs[UNLABELLED] = ("a folder of files without class folders carries no labels: put the files in one "
                                   "subfolder per class, or give labels by source (data.train={pos: pos_folder, neg: "
                                   "neg_folder})")
        return frame
    frame, more, per_label = read_examples(cfg, labelled, split, folder)
    record(tally, Count(split, folder, len(frame), {**skipped, **more}, per_label))
    return frame


# ---- labels given per source --------------------------------------------------------------------------------

def read_mapping(cfg, mapping: Mapping, split: str, tally: Tally | None, read_file: Callable):
    """``{label: file or folder}``: every row of a source gets its label (a table's own label column is an error:
    say which one counts)."""
    if cfg.classes is not None:
        raise DataError("data.classes picks class folders; with a mapping label -> source, list only the labels you want")
    text_name, label_name = columns(cfg)
    frames = []
    for label, source in mapping.items():
        if not isinstance(source, str) or not source:
            raise DataError(f"data.{split}.{label}: give a file or folder path, not {source!r}")
        if not os.path.exists(source):
            raise DataError(f"data.{split}.{label}: not found: {source} (relative paths start from {os.getcwd()})")
        if os.path.isdir(source) and not (is_saved_dataset(source) or is_saved_dict(source)):
            if cfg.type.value != "single":
                raise DataError(f"data.{split}.{label}={source} is a folder of files (one text per file): that is "
                                f"data.type=single, not {cfg.type.value}")
            frame, skipped = folder_examples(cfg, source, str(label), split)
            record(tally, Count(split, source, len(frame), skipped, {str(label): len(frame)}))
        else:
            frame = read_file(cfg, source, split, tally)
            if tally:
                tally[-1].classes = {str(label): len(frame)}
            if label_name in frame.columns:
                raise DataError(f"data.{split}.{label}={source} has its own column {label_name!r}: a mapping gives every "
                                f"row of a source its label. Drop the mapping (data.label_field names the column) or set "
                                f"data.label_field to a name the file does not use")
        frames.append(with_label(frame, label_name, str(label)))
    return concat(frames)


def with_label(frame, name: str, label: str):
    if isinstance(frame, streaming.ArrowFrame):
        import pyarrow as pa

        table = frame.table
        if name in table.column_names:
            table = table.drop_columns([name])
        return streaming.ArrowFrame(table.append_column(name, pa.repeat(pa.scalar(label), table.num_rows)))
    frame = frame.copy()
    frame[name] = label
    return frame


def concat(frames: list):
    """One frame of the sources in order: in memory, or an Arrow table when any of them stays on disk. The file
    column of folders is kept only when every source has one."""
    for column in ORIGIN_COLUMNS:
        if not all(column in f.columns for f in frames):
            frames = [without(f, column) for f in frames]
    if not any(isinstance(f, streaming.ArrowFrame) for f in frames):
        return pd.concat(frames, ignore_index=True)
    import pyarrow as pa

    tables = [f.table if isinstance(f, streaming.ArrowFrame) else pa.Table.from_pandas(f.astype(str), preserve_index=False)
              for f in frames]
    names = tables[0].column_names
    if any(t.column_names != names for t in tables):
        raise DataError(f"the sources of one split have different columns: {[t.column_names for t in tables]}")
    return streaming.ArrowFrame(pa.concat_tables([t.cast(tables[0].schema) for t in tables]))


def without(frame, column: str):
    if column not in frame.columns:
        return frame
    if isinstance(frame, streaming.ArrowFrame):
        return streaming.ArrowFrame(frame.table.drop_columns([column]))
    return frame.drop(columns=[column])


def record(tally: Tally | None, count: Count) -> None:
    if tally is None:
        log.info(count.line())
    else:
        tally.add(count)


# ---- datasets' save_to_disk folders and .arrow files ----------------------------------------------------------

def read_small_json(path: str) -> dict:
    """A JSON object from a shared folder: data, size-bounded."""
    if os.path.getsize(path) > MAX_JSON:
        raise DataError(f"{path} is larger than {MAX_JSON // 1024} KB: not a datasets metadata file")
    try:
        value = json.loads(open(path, "rb").read())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def saved_files(folder: str) -> list[str]:
    """The Arrow files state.json lists: plain names of files inside the folder (no path leaves it)."""
    files = read_small_json(os.path.join(folder, "state.json")).get("_data_files")
    if not isinstance(files, list) or not files:
        raise DataError(f"{folder}/state.json lists no data files: not a folder written by save_to_disk")
    names = []
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or os.path.basename(name) != name or name in (".", "..") or not name.endswith(".arrow"):
            raise DataError(f"{folder}/state.json names {name!r} as a data file: only .arrow files inside the folder "
                            f"are read")
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.islink(path):
            raise DataError(f"{folder}/state.json lists {name}, which is not a file in the folder")
        names.append(path)
    return names


def class_names(folder: str) -> dict[str, list[str]]:
    """column -> names of its ClassLabel feature (dataset_info.json), read as data: other features are ignored."""
    path = os.path.join(folder, "dataset_info.json")
    if not os.path.isfile(path):
        return {}
    features = read_small_json(path).get("features")
    out = {}
    if isinstance(features, dict):
        for column, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
                names = feature.get("names")
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    out[column] = names
    return out


def read_arrow(cfg, paths: list[str], names: dict[str, list[str]], where: str, split: str, tally: Tally | None):
    """Arrow files as one table: mapped (kept on disk) above data.streaming_above_mb, else a DataFrame.
    ClassLabel ids become their names (-1, datasets' "no label", becomes a missing label)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables([streaming.mapped_table(p) for p in paths]) if len(paths) > 1 else streaming.mapped_table(paths[0])
    for column, labels in names.items():
        if column in table.column_names:
            ids = table.column(column)
            valid = pc.and_(pc.greater_equal(ids, 0), pc.less(ids, len(labels)))
            named = pa.array(labels).take(pc.if_else(valid, ids, pa.scalar(None, ids.type)))
            table = table.set_column(table.column_names.index(column), column, named)
    if table.num_rows == 0:
        raise DataError(f"data.{split}: {where} has no rows")
    table = embedded_images(cfg, table)
    size = sum(os.path.getsize(p) for p in paths)
    stream = cfg.streaming if cfg.streaming is not None else size > cfg.streaming_above_mb * 2**20
    if names:
        log.info("%s: class ids read as their names (%s)", where, "; ".join(f"{c}: {n}" for c, n in names.items()))
    record(tally, Count(split, where, table.num_rows))
    return streaming.ArrowFrame(table) if stream else table.to_pandas()


def embedded_images(cfg, table):
    """Image data whose image column holds the images themselves (datasets' Image feature): as files in the cache."""
    from runner.schema import IMAGE_TYPES

    if cfg.type not in IMAGE_TYPES:
        return table
    from runner.images import embedded_to_files

    return embedded_to_files(table, str(cfg.image_field), Path(streaming.cfg_cache_dir()))


def read_saved(cfg, folder: str, split: str, tally: Tally | None):
    if is_saved_dict(folder):
        inner = saved_splits(folder)
        raise DataError(f"data.{split}={folder} is a saved DatasetDict with splits {sorted(inner)}: name one, e.g. "
                        f"data.{split}={os.path.join(folder, next(iter(inner)))}")
    return read_arrow(cfg, saved_files(folder), class_names(folder), folder, split, tally)


def read_folder(cfg, folder: str, split: str, tally: Tally | None):
    """A folder as its layout says (the first of LAYOUTS whose test holds)."""
    for test, reader in LAYOUTS:
        if test(folder):
            return reader(cfg, folder, split, tally)
    raise AssertionError("unreachable: a folder is a class folder at least")


def read_split_folder(cfg, folder: str, split: str, tally: Tally | None):
    inner = split_folders(folder)
    raise DataError(f"data.{split}={folder} holds the splits {sorted(inner)}: name one, e.g. "
                    f"data.{split}={inner.get('test', next(iter(inner.values())))}")


LAYOUTS: list[tuple[Callable[[str], bool], Callable]] = [
    (lambda p: is_saved_dict(p) or is_saved_dataset(p), read_saved),
    (lambda p: bool(split_folders(p)), read_split_folder),
    (os.path.isdir, read_class_folder),
]

