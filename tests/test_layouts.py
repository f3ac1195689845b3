"""Data as it is shipped: a folder per class (with split folders), a mapping label -> source, one example per
line, legacy encodings, compressed files, and folders written by datasets' save_to_disk (runner/sources.py).
Each layout is built in a temporary folder; counts and labels are checked exactly."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zipfile
from pathlib import Path

import pytest
import zstandard

from runner.data import load_dataset
from runner.errors import DataError
from runner.schema import DataConfig
from tests.conftest import make_sentences, run_cli


def class_folders(root: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """root/<split>/<label>/<i>.txt, one file per example, plus the clutter real corpora carry."""
    for split, rows in splits.items():
        for i, (text, label) in enumerate(rows):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.txt").write_text(text + "\n")
        (root / split / "pos" / ".DS_Store").write_bytes(b"\0\0binary")
        (root / split / "neg" / "Thumbs.db").write_bytes(b"\0\0binary")
        (root / split / "pos" / "empty.txt").write_text("")
        (root / split / "neg" / "blank.txt").write_text("  \n\n")
        (root / split / "urls_pos.txt").write_text("http://example.com\n")  # beside the class folders
    return root


def read(**options) -> object:
    return load_dataset(DataConfig(**options))


def by_label(ds, split: str = "train") -> dict[str, list[str]]:
    part = getattr(ds, split)
    out: dict[str, list[str]] = {}
    for text, label in zip(part.texts, part.labels.tolist()):
        out.setdefault(ds.label_names[label], []).append(text)
    return {k: sorted(v) for k, v in out.items()}


def test_a_folder_per_class_with_split_folders(tmp_path):
    train, test = make_sentences(40, 0), make_sentences(12, 1)
    root = class_folders(tmp_path / "corpus", {"train": train, "test": test, "dev": make_sentences(10, 2)})
    ds = read(train=str(root))
    assert ds.label_names == ["neg", "pos"]
    assert by_label(ds) == {label: sorted(t for t, y in train if y == label) for label in ("neg", "pos")}
    assert len(ds.validation) == 10 and len(ds.test) == 12  # dev/ is the validation split
    counts = {c["split"]: c for c in ds.sources}
    assert counts["train"]["rows"] == 40 and counts["train"]["classes"] == {"neg": 20, "pos": 20}
    assert counts["train"]["skipped"] == {"files beside the class folders": 1, "hidden files": 2, "empty files": 1,
                                          "blank files": 1}


def test_class_folders_picked_and_renamed(tmp_path):
    rows = make_sentences(30, 0, labels=("pos", "neg", "unsup"))
    root = class_folders(tmp_path / "imdb", {"train": rows})
    ds = read(train=str(root / "train"), classes=["neg", "pos"], label_names={"neg": "negative", "pos": "positive"},
              validation_split=0.2)
    assert ds.label_names == ["negative", "positive"] and len(ds.train) + len(ds.validation) == 20
    assert ds.sources[0]["skipped"]["files of classes not in data.classes (unsup)"] == 10
    with pytest.raises(DataError, match=r"data.classes: .* has no class folder 'neutral'; its class folders are \['neg', 'pos', 'unsup'\]"):
        read(train=str(root / "train"), classes=["neutral"])


def test_a_streamed_class_folder_reads_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "arrow"))
    root = class_folders(tmp_path / "c", {"train": make_sentences(50, 0), "test": make_sentences(10, 1)})
    memory, mapped = read(train=str(root), streaming=False), read(train=str(root), streaming=True)
    assert mapped.train.streamed and not memory.train.streamed
    assert list(mapped.train.texts) == list(memory.train.texts) and (mapped.train.labels == memory.train.labels).all()
    assert list(mapped.test.texts) == list(memory.test.texts)


def test_a_mapping_of_lines_files_labels_each_source(tmp_path):
    (tmp_path / "pos.txt").write_bytes(b"great film\r\n\r\nloved it\n")
    (tmp_path / "neg.txt").write_bytes(b"bad film\nawful\n\n\npoor plot")  # no line end after the last line
    ds = read(train={"pos": str(tmp_path / "pos.txt"), "neg": str(tmp_path / "neg.txt")}, validation_split=0.4)
    texts = sorted(zip(list(ds.train.texts) + list(ds.validation.texts),
                       [ds.label_names[y] for y in list(ds.train.labels) + list(ds.validation.labels)]))
    assert texts == [("awful", "neg"), ("bad film", "neg"), ("great film", "pos"), ("loved it", "pos"), ("poor plot", "neg")]
    assert [(c["rows"], c["skipped"], c["classes"]) for c in ds.sources] == [
        (2, {"blank lines": 1}, {"pos": 2}), (3, {"blank lines": 2}, {"neg": 3})]


def test_a_mapping_to_folders_and_a_table_with_its_own_label_column(tmp_path):
    for label in ("pos", "neg"):
        (tmp_path / label).mkdir()
        for i, (text, _) in enumerate(make_sentences(6, 3)):
            (tmp_path / label / f"{i}.txt").write_text(f"{label} {text}")
    ds = read(train={"pos": str(tmp_path / "pos"), "neg": str(tmp_path / "neg")}, validation_split=0.25)
    assert len(ds.train) + len(ds.validation) == 12 and ds.label_names == ["neg", "pos"]
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match="has its own column 'label': a mapping gives every row of a source its label"):
        read(train={"pos": str(tmp_path / "t.csv"), "neg": str(tmp_path / "neg")})


def test_only_newline_and_crlf_end_a_line(tmp_path):
    """U+0085 (NEL), U+2028 (line separator) and form feeds are text inside a line, as is a lone CR."""
    path = tmp_path / "reviews.txt"
    path.write_bytes("one\u0085two\r\nthree\u2028four\n\nfive\x0csix\n \t \nseven\rmid\r\n".encode())
    ds = read(train={"a": str(path), "b": str(path)}, validation_split=0.5, seed=0)
    texts = sorted(set(ds.train.texts) | set(ds.validation.texts))
    assert texts == sorted(["one\u0085two", "three\u2028four", "five\x0csix", "seven\rmid"])
    assert ds.sources[0]["rows"] == 4 and ds.sources[0]["skipped"] == {"blank lines": 2}


def test_a_txt_file_without_a_delimiter_is_one_example_per_line_and_a_table_is_still_a_table(tmp_path):
    from runner.data import read_table

    (tmp_path / "lines.txt").write_text("a sentence, with a comma\nanother one\nand, a, third\n")
    (tmp_path / "table.txt").write_text("text;label\ngood, fine;pos\nbad;neg\n")
    assert read_table(str(tmp_path / "lines.txt"), DataConfig(), "train")["text"].tolist() == [
        "a sentence, with a comma", "another one", "and, a, third"]
    assert read_table(str(tmp_path / "table.txt"), DataConfig(), "train")["label"].tolist() == ["pos", "neg"]
    with pytest.raises(DataError, match="no column 'label'.*one example per line carries no label"):
        read(train=str(tmp_path / "lines.txt"))


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_legacy_encodings_with_auto(tmp_path, encoding, caplog):
    texts = {"cp1252": ["He said \u201cthat\u2019s it\u201d \u2014 the caf\u00e9 costs \u20ac5", "na\u00efve \u2026 d\u00e9j\u00e0 vu"],
             "latin-1": ["Caf\u00e9 na\u00efve, r\u00e9sum\u00e9", "se\u00f1or a\u00f1o \u00fcber gr\u00f6\u00dfe \u00bd"]}[encoding]
    (tmp_path / "pos.txt").write_bytes("\n".join(texts).encode(encoding) + b"\n")
    (tmp_path / "neg.txt").write_bytes(b"plain ascii\nalso plain\n")
    train = {"pos": str(tmp_path / "pos.txt"), "neg": str(tmp_path / "neg.txt")}
    caplog.set_level("INFO", "runner")
    ds = read(train=train, encoding="auto", validation_split=0.5, seed=1)
    assert sorted(set(ds.train.texts) | set(ds.validation.texts)) == sorted(texts + ["plain ascii", "also plain"])
    assert "not UTF-8 (byte" in caplog.text and "data.encoding=auto, confidence" in caplog.text
    first_bad = "\n".join(texts).encode(encoding).index(next(c for c in "\n".join(texts) if ord(c) > 127).encode(encoding))
    with pytest.raises(DataError, match=rf"pos.txt: byte {first_bad} \(line 1\) is not valid utf-8 .*it looks like cp1252: "
                                        rf"set data.encoding=cp1252 \(or data.encoding=auto"):
        read(train=train)


def test_latin1_with_bytes_cp1252_lacks_and_a_tar_archive(tmp_path):
    """Old Usenet posts are Latin-1 with stray control bytes (0x81 is unassigned in cp1252): auto reads them as
    Latin-1. A .tar.gz is an archive, not a table: one error that says to extract it."""
    import io
    import tarfile

    for label, body in (("sci.space", b"Subject: caf\xe9 \x81\nnai\xefve r\xe9sum\xe9 of the launch\n"),
                        ("rec.autos", b"Subject: engines\nplain text\n")):
        (tmp_path / "news" / label).mkdir(parents=True)
        (tmp_path / "news" / label / "49960").write_bytes(body)
        (tmp_path / "news" / label / "49961").write_bytes(body.replace(b"Subject", b"Re"))
    ds = read(train=str(tmp_path / "news"), encoding="auto", validation_split=0.5)
    texts = set(ds.train.texts) | set(ds.validation.texts)
    assert "Subject: caf\u00e9 \x81\nnai\u00efve r\u00e9sum\u00e9 of the launch" in texts
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = b"text,label\na,b\n"
        info = tarfile.TarInfo("train.csv")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    (tmp_path / "data.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match=r"data.tar.gz looks like a tar archive \(extract it"):
        read(train=str(tmp_path / "data.tar.gz"))


def test_the_undecodable_byte_is_named_by_offset_and_line_in_a_large_file(tmp_path):
    """The byte lies past the first read chunks and after CRLF lines: its offset and line are exact."""
    body = "text,label\r\n" + "".join(f"row {i},pos\r\n" for i in range(300_000))
    path = tmp_path / "big.csv"
    path.write_bytes(body.encode() + "caf\u00e9,neg\r\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"big.csv: byte {len(body) + 3:,} \(line 300002\) is not valid utf-8"):
        read(train=str(path))


COMPRESSORS = {
    "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
    "zst": lambda data: zstandard.ZstdCompressor().compress(data),
}


def write_compressed(path: Path, data: bytes, kind: str) -> Path:
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(Path(path).stem, data)
            archive.writestr("__MACOSX/._" + Path(path).stem, b"resource fork")
    else:
        path.write_bytes(COMPRESSORS[kind](data))
    return path


@pytest.mark.parametrize("kind", ["gz", "bz2", "xz", "zst", "zip"])
@pytest.mark.parametrize("streaming", [False, True])
def test_compressed_files_read_as_their_inner_format(tmp_path, kind, streaming, monkeypatch):
    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "arrow"))
    rows = make_sentences(30, 0)
    csv_bytes = ("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)).encode()
    train = write_compressed(tmp_path / f"train.csv.{kind}", csv_bytes, kind)
    lines = write_compressed(tmp_path / f"extra.txt.{kind}", b"first line\n\nsecond line\n", kind)
    ds = read(train=str(train), validation_split=0.2, streaming=streaming)
    assert ds.train.streamed == streaming
    assert sorted(zip(list(ds.train.texts) + list(ds.validation.texts),
                      [ds.label_names[y] for y in list(ds.train.labels) + list(ds.validation.labels)])) == sorted(rows)
    mixed = read(train={"extra": str(lines), "other": str(lines)}, validation_split=0.5, streaming=streaming)
    assert sorted(set(mixed.train.texts) | set(mixed.validation.texts)) == ["first line", "second line"]


def test_a_zip_of_several_files_and_a_double_compressed_file_are_errors(tmp_path):
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.csv", "text,label\n")
        archive.writestr("b.csv", "text,label\n")
    with pytest.raises(DataError, match=r"two.zip: a zip archive is read when it holds exactly one file; it holds 2"):
        read(train=str(tmp_path / "two.zip"))
    (tmp_path / "twice.csv.gz").write_bytes(gzip.compress(gzip.compress(b"text,label\na,b\n")))
    with pytest.raises(DataError, match="looks gzip-compressed inside a compressed file"):
        read(train=str(tmp_path / "twice.csv.gz"))


@pytest.fixture
def saved(tmp_path) -> Path:
    """A DatasetDict (train/validation/test, a ClassLabel label) written by datasets' save_to_disk."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})

    def split(n: int, seed: int):
        rows = make_sentences(n, seed)
        return datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [int(y == "pos") for _, y in rows]},
                                          features=features)

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": split(40, 0), "validation": split(10, 1), "test": split(12, 2)}).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_dict_and_its_splits(saved, tmp_path):
    ds = read(train=str(saved))
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (40, 10, 12) and ds.label_names == ["neg", "pos"]
    assert by_label(ds) == {y: sorted(t for t, label in make_sentences(40, 0) if label == y) for y in ("neg", "pos")}
    one = read(train=str(saved / "train"), validation=str(saved / "validation"))  # a saved Dataset
    assert one.train.texts == ds.train.texts and (one.train.labels == ds.train.labels).all()
    hub = read(hub=str(saved), train="train", validation="validation", test="test")  # split names, as for the hub
    assert (len(hub.train), len(hub.validation), len(hub.test)) == (40, 10, 12)
    arrow = next((saved / "train").glob("*.arrow"))
    direct = read(train=str(arrow), validation=str(arrow))  # an .arrow file: the ids, no ClassLabel names
    assert direct.label_names == [0, 1] and len(direct.train) == 40


def test_a_saved_folder_cannot_point_outside_itself(saved):
    """state.json and dataset_dict.json are data from whoever shared the folder: only .arrow files inside the
    folder, and splits that are its subfolders, are read."""
    listing = saved / "dataset_dict.json"
    listing.write_text(json.dumps({"splits": ["train", "../../elsewhere"]}))
    with pytest.raises(DataError, match="'splits' must list the names of subfolders of the folder"):
        read(train=str(saved))
    listing.write_text(json.dumps({"splits": ["train", "validation", "test"]}))
    state = saved / "train" / "state.json"
    for name in ("../../secret.arrow", "/etc/passwd", "data.pkl"):
        value = json.loads(state.read_text())
        value["_data_files"] = [{"filename": name}]
        state.write_text(json.dumps(value))
        with pytest.raises(DataError, match="only .arrow files inside the folder are read"):
            read(train=str(saved / "train"))


# ---- the same layouts through the command line: k-fold sweeps, predict and evaluate -------------------------

def layouts(tmp_path: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (training overrides, a labelled test source as evaluate takes it, an input as predict takes it)."""
    root = class_folders(tmp_path / "folders", {"train": make_sentences(48, 0), "test": make_sentences(12, 1)})
    for label in ("pos", "neg"):
        for split, seed in (("train", 0), ("test", 1)):
            rows = [t for t, y in make_sentences(48 if split == "train" else 12, seed) if y == label]
            (tmp_path / f"{split}_{label}.txt").write_text("\n".join(rows) + "\n")
    mapping = {s: f"{{pos: {tmp_path}/{s}_pos.txt, neg: {tmp_path}/{s}_neg.txt}}" for s in ("train", "test")}
    for split, seed in (("train", 0), ("test", 1)):
        body = "text,label\n" + "".join(f"{t},{y}\n" for t, y in make_sentences(48 if split == "train" else 12, seed))
        (tmp_path / f"{split}.csv.gz").write_bytes(gzip.compress(body.encode()))
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"text": [t for t, _ in make_sentences(n, seed)], "label": [int(y == "pos") for _, y in make_sentences(n, seed)]},
        features=features) for split, n, seed in (("train", 48, 0), ("test", 12, 1))}).save_to_disk(str(tmp_path / "saved"))
    return {
        "class folders": ([f"data.train={root}"], str(root), str(root / "test" / "pos")),
        "saved DatasetDict": ([f"data.train={tmp_path}/saved"], f"{tmp_path}/saved/test", f"{tmp_path}/saved/test"),
        "mapping of lines": ([f"data.train={mapping['train']}"], mapping["test"], f"{tmp_path}/test_pos.txt"),
        "gzipped csv": ([f"data.train={tmp_path}/train.csv.gz", f"data.test={tmp_path}/test.csv.gz"],
                        f"{tmp_path}/test.csv.gz", f"{tmp_path}/test.csv.gz"),
    }


@pytest.mark.parametrize("layout", ["class folders", "mapping of lines", "gzipped csv", "saved DatasetDict"])
def test_k_fold_sweeps_predict_and_evaluate_on_each_layout(layout, tmp_path, tokenizer_dir, monkeypatch, capsys):
    from runner.evaluate import EvaluateConfig, evaluate
    from runner.predict import parse_args, predict

    monkeypatch.chdir(tmp_path)
    train, test, inputs = layouts(tmp_path)[layout]
    base = ["model=tiny", f"model.tokenizer={tokenizer_dir}", "data=csv", "hardware=cpu", "precision=fp32",
            "train.epochs=2", "train.batch_size=8", "train.progress=false", "tracking.enabled=false",
            f"cache.dir={tmp_path / 'cache'}", *train]
    code, out = run_cli(["-m", *base, "cv.folds=2", "save_model=false", "train.lr=1e-3,3e-3",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys)
    assert code == 0, out
    assert "[job 0] objective cv/val/accuracy_mean" in out and "[job 1] objective cv/val/accuracy_mean" in out
    for job in ("0", "1"):
        assert len(json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["folds"]) == 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out = run_cli([*base, f"output_dir={tmp_path / 'run'}", "tracking.enabled=true", f"tracking.uri={uri}",
                         "tracking.log_model=false"], capsys)
    assert code == 0, out
    sources = json.loads((tmp_path / "run" / "data_sources.json").read_text())
    assert sum(c["rows"] for c in sources if c["split"] == "train") == 48
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    logged = json.loads(Path(client.download_artifacts(run_id, "data_sources.json", str(tmp_path))).read_text())
    assert logged == sources  # the counts per source, in the MLflow store
    model = tmp_path / "run" / "model"
    evaluated = evaluate(parse_args([f"model_dir={model}", f"data.test={test}", "progress=false", "tracking=false"],
                                    EvaluateConfig))
    assert evaluated["rows"] == 12 and 0 <= evaluated["metrics"]["test/accuracy"] <= 1
    predicted = predict(parse_args([f"model_dir={model}", f"input={inputs}", "progress=false"]))
    assert len(predicted) == (6 if layout in ("class folders", "mapping of lines") else 12)  # one class's files or lines
    if layout == "mapping of lines":  # a lines file: each prediction names its line
        lines = Path(inputs).read_text().splitlines()
        assert [lines[r["line"] - 1] for r in predicted] == [line for line in lines if line.strip()]
    if layout == "class folders":  # a folder of files: each prediction names its file
        assert [Path(r["file"]).name for r in predicted] == sorted(p.name for p in Path(inputs).iterdir()
                                                                  if p.name.endswith(".txt") and p.stat().st_size > 0
                                                                  and not p.name.startswith("."))
