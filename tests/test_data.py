"""Reading csv/tsv/jsonl/parquet, label maps, validation splits, and errors naming file, row and column."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from runner.data import load_dataset
from runner.errors import DataError
from runner.schema import DataConfig
from tests.conftest import make_sentences, shared_data, write_csv


def config(**kw) -> DataConfig:
    return DataConfig(**kw)


def test_csv_with_string_labels_and_a_validation_file(tmp_path):
    train = write_csv(tmp_path / "t.csv", make_sentences(30, 0, labels=("b", "a", "c")))
    val = write_csv(tmp_path / "v.csv", make_sentences(9, 1, labels=("c", "a", "b")))
    ds = load_dataset(config(train=str(train), validation=str(val)))
    assert ds.label_names == ["a", "b", "c"]
    assert len(ds.train) == 30 and len(ds.validation) == 9 and ds.test is None
    assert ds.label_names[ds.train.labels[0]] == "b"


def test_integer_labels_stay_integers(tmp_path):
    train = write_csv(tmp_path / "t.csv", make_sentences(20, 0, labels=(1, 0)))
    ds = load_dataset(config(train=str(train), validation_split=0.25))
    assert ds.label_names == [0, 1]
    assert json.loads(json.dumps(ds.label_names)) == [0, 1]


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_other_formats_from_the_extension(tmp_path, fmt):
    frame = pd.DataFrame(make_sentences(20, 0), columns=["sentence", "y"])
    path = tmp_path / f"train.{fmt}"
    if fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    ds = load_dataset(config(train=str(path), text_field="sentence", label_field="y"))
    assert len(ds.train) + len(ds.validation) == 20
    assert ds.label_names == ["neg", "pos"]


def test_validation_split_is_stratified_and_seeded(tmp_path):
    train = write_csv(tmp_path / "t.csv", make_sentences(100, 0, labels=("a", "a", "a", "b")))
    first = load_dataset(config(train=str(train), validation_split=0.2, seed=7))
    again = load_dataset(config(train=str(train), validation_split=0.2, seed=7))
    assert np.bincount(first.validation.labels).tolist() == [15, 5]
    assert first.validation.texts == again.validation.texts
    assert len(first.train) == 80


def test_max_train_samples_takes_the_first_rows(tmp_path):
    rows = make_sentences(50, 0)
    train = write_csv(tmp_path / "t.csv", rows)
    ds = load_dataset(config(train=str(train), validation=str(train), max_train_samples=10))
    assert ds.train.texts == [r[0] for r in rows[:10]]


def expect_error(match: str, **kw):
    with pytest.raises(DataError, match=match):
        load_dataset(config(**kw))


def test_missing_file(tmp_path):
    expect_error(r"data\.train: file not found: .*nope\.csv", train=str(tmp_path / "nope.csv"))


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "e.csv").write_text("")
    expect_error(r"e\.csv is empty", train=str(tmp_path / "e.csv"))
    (tmp_path / "h.csv").write_text("text,label\n")
    expect_error(r"h\.csv has a header but no rows", train=str(tmp_path / "h.csv"))


def test_missing_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", make_sentences(6, 0), header=("sentence", "label"))
    expect_error(r"no column 'text' \(data\.text_field\); the file has columns \['sentence', 'label'\]", train=str(path))


def test_blank_label_names_row_and_column(tmp_path):
    rows = make_sentences(6, 0)
    rows[3] = (rows[3][0], "")
    path = write_csv(tmp_path / "t.csv", rows)
    expect_error(r"t\.csv: 1 rows have no label in column 'label' \(empty, NaN, NA, null or None; rows 5\)", train=str(path))


def test_unseen_validation_label_names_row(tmp_path):
    train = write_csv(tmp_path / "t.csv", make_sentences(6, 0))
    val = write_csv(tmp_path / "v.csv", [("good film", "pos"), ("a film", "mixed")])
    expect_error(r"v\.csv: row 3, column 'label': label 'mixed' does not occur", train=str(train), validation=str(val))


def test_wrong_encoding_says_which_setting_to_change(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("text,label\ncaf\xe9 good,pos\nbad,neg\n".encode("latin-1"))
    expect_error(r"not valid utf-8 .*data\.encoding", train=str(path))
    ds = load_dataset(config(train=str(path), validation=str(path), encoding="latin-1"))
    assert ds.train.texts[0] == "café good"


def test_ragged_rows_point_at_delimiter_and_quoting(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood,pos\na,b,c,d\n")
    expect_error(r"t\.csv: line 3 has 4 fields where the first has 2: set data\.bad_lines=skip.*data\.delimiter", train=str(path))


def test_no_validation_and_no_split_is_an_error(tmp_path):
    train = write_csv(tmp_path / "t.csv", make_sentences(6, 0))
    expect_error(r"no validation data", train=str(train), validation_split=0.0)


def test_real_trec_files_with_string_labels():
    train = shared_data("trec", "train.csv")
    ds = load_dataset(config(train=str(train), test=str(shared_data("trec", "test.csv"))))
    assert ds.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(ds.train) + len(ds.validation) == 5452 and len(ds.test) == 500


def test_real_raw_mrpc_needs_quoting_none():
    """The raw MRPC file has a BOM, CRLF and raw quotes inside tab-separated fields."""
    raw = shared_data("mrpc", "raw", "msr_paraphrase_train.txt")
    common = dict(train=str(raw), format="tsv", text_field="#1 String", label_field="Quality", encoding="utf-8-sig")
    with pytest.raises(DataError):
        load_dataset(config(**common))
    ds = load_dataset(config(**common, quoting="none"))
    assert len(ds.train) + len(ds.validation) == 4076


def test_pairs_with_scores_and_bad_score_row(tmp_path):
    path = write_csv(tmp_path / "p.csv", [("a b", "a c", "4.5"), ("x", "y", "0")], header=("s1", "s2", "score"))
    ds = load_dataset(config(type="pair", train=str(path), validation=str(path), text_fields=["s1", "s2"],
                             label_field="score"), target="score")
    assert ds.train.columns == [["a b", "x"], ["a c", "y"]] and ds.train.labels.tolist() == [4.5, 0.0]
    assert ds.label_names == []
    bad = write_csv(tmp_path / "b.csv", [("a", "b", "1"), ("c", "d", "high")], header=("s1", "s2", "score"))
    with pytest.raises(DataError, match=r"b\.csv: row 3, column 'score': score 'high' is not a number"):
        load_dataset(config(type="pair", train=str(bad), text_fields=["s1", "s2"], label_field="score"), target="score")


def test_pair_needs_two_text_fields_and_names_the_key(tmp_path):
    path = write_csv(tmp_path / "p.csv", [("a", "b", "1")], header=("q", "d", "label"))
    with pytest.raises(DataError, match="no column 'sentence1' \\(data.text_fields\\)"):
        load_dataset(config(type="pair", train=str(path)))
    with pytest.raises(DataError, match="data.type=pair needs two data.text_fields"):
        load_dataset(config(type="pair", train=str(path), text_fields=["q"]))


def test_triplets_from_jsonl_without_labels(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"anchor": f"a{i}", "positive": f"p{i}", "negative": f"n{i}"} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_dataset(config(type="triplet", train=str(path), validation_split=0.2), target="none")
    assert ds.train.labels is None and len(ds.train) == 8 and len(ds.validation) == 2
    assert [len(c) for c in ds.train.columns] == [8, 8, 8]
    no_negative = load_dataset(config(type="triplet", train=str(path), negative_field=None), target="none")
    assert len(no_negative.train.columns) == 2


def test_multi_label_cells_become_multi_hot_rows(tmp_path):
    path = write_csv(tmp_path / "m.csv", [("x", "sports,news"), ("y", "news"), ("z", "tech")])
    ds = load_dataset(config(train=str(path), validation=str(path)), target="multi_label")
    assert ds.label_names == ["news", "sports", "tech"]
    assert ds.train.labels.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]


def test_hub_split_names_are_ignored_when_train_is_a_local_file(tmp_path):
    train = write_csv(tmp_path / "t.csv", make_sentences(20, 0))
    ds = load_dataset(config(hub="org/some-dataset", train=str(train), validation="dev", test="test"))
    assert ds.test is None and len(ds.train) + len(ds.validation) == 20  # validation split off train
