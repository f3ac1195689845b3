"""Files as they come (issue: any data a user brings): no header, columns by position, several text
columns joined, splits from a column, label names, blank lines, CRLF, BOM, quoted newlines, stray quotes,
long lines, sniffed delimiters; each read gives the same rows as its clean twin."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pandas as pd
import pytest

from runner.data import load_dataset
from runner.errors import DataError
from runner.metrics import classification_metrics
from runner.schema import DataConfig, DataType
from tests.conftest import make_sentences

ROWS = make_sentences(40, 0, labels=("pos", "neg"))


def same_rows(a, b) -> None:
    assert a.label_names == b.label_names
    for split in ("train", "validation", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.columns == y.columns
            assert np.array_equal(x.labels, y.labels)


def clean_csv(tmp_path):
    path = tmp_path / "clean.csv"
    pd.DataFrame(ROWS, columns=["text", "label"]).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("quirk", ["blank first line", "crlf", "bom", "blank lines between", "all three"])
def test_quirky_csv_reads_the_same_rows_as_its_clean_twin(tmp_path, quirk):
    clean = clean_csv(tmp_path)
    text = clean.read_text()
    if quirk in ("blank first line", "all three"):
        text = "\n" + text
    if quirk == "blank lines between":
        text = text.replace("\n", "\n\n", 5)
    data = text.encode()
    if quirk in ("crlf", "all three"):
        data = data.replace(b"\n", b"\r\n")
    if quirk in ("bom", "all three"):
        data = b"\xef\xbb\xbf" + data
    quirky = tmp_path / "quirky.csv"
    quirky.write_bytes(data)
    same_rows(load_dataset(DataConfig(train=str(quirky))), load_dataset(DataConfig(train=str(clean))))


@pytest.mark.parametrize("quirk", ["bom", "crlf", "blank lines"])
def test_quirky_jsonl_reads_the_same_rows(tmp_path, quirk):
    lines = [json.dumps({"text": t, "label": y}) for t, y in ROWS]
    clean, quirky = tmp_path / "clean.jsonl", tmp_path / "quirky.jsonl"
    clean.write_text("\n".join(lines) + "\n")
    body = {"bom": "\ufeff" + "\n".join(lines), "crlf": "\r\n".join(lines), "blank lines": "\n\n" + "\n\n".join(lines) + "\n\n"}
    quirky.write_text(body[quirk], encoding="utf-8")
    same_rows(load_dataset(DataConfig(train=str(quirky))), load_dataset(DataConfig(train=str(clean))))


def test_quoted_newlines_stay_inside_their_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"first line\nsecond line",pos\nplain,neg\nalso plain,pos\nmore,neg\n')
    ds = load_dataset(DataConfig(train=str(path), validation=str(path)))
    assert ds.train.texts[0] == "first line\nsecond line" and len(ds.train) == 4


def test_headerless_semicolon_txt_with_named_columns(tmp_path, caplog):
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{t};{y}\n" for t, y in ROWS))
    caplog.set_level(logging.INFO, "runner")
    ds = load_dataset(DataConfig(train=str(path), delimiter="semicolon", header=False, columns=["text", "label"]))
    assert len(ds.train) + len(ds.validation) == 40 and ds.label_names == ["neg", "pos"]
    assert "40 rows read from" in caplog.text
    same_rows(ds, load_dataset(DataConfig(train=str(path), delimiter=";", header=False, text_field=0, label_field=1)))


def test_txt_delimiter_is_sniffed_and_logged(tmp_path, caplog):
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{y}\t{t}" + (", with, commas" if i % 3 == 0 else "") + "\n" for i, (t, y) in enumerate(ROWS)))
    caplog.set_level(logging.INFO, "runner")
    ds = load_dataset(DataConfig(train=str(path), validation=str(path), header=False, columns=["label", "text"]))
    assert "it looks tab-separated (data.delimiter=tab)" in caplog.text
    assert ds.train.texts[0].endswith(", with, commas")


def test_label_tab_text_by_position(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_text("".join(f"{y}\t{t}\n" for t, y in ROWS))
    ds = load_dataset(DataConfig(train=str(path), delimiter="tab", header=False, text_field=1, label_field=0))
    assert ds.label_names == ["neg", "pos"] and ds.train.texts[0] in {t for t, _ in ROWS}


def test_headerless_without_names_says_how_to_name_columns(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("".join(f"{y}\t{t}\n" for t, y in ROWS))
    with pytest.raises(DataError, match=r"data\.header=false and the columns have no names: name them \(data\.columns"):
        load_dataset(DataConfig(train=str(path), header=False))


def test_a_header_that_is_data_suggests_the_header_option(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("".join(f"{y}\t{t}\n" for t, y in ROWS))
    with pytest.raises(DataError, match=r"no column 'text'.*set data\.header=false and name the columns"):
        load_dataset(DataConfig(train=str(path)))


def test_wrong_number_of_column_names(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("".join(f"{y}\t{t}\n" for t, y in ROWS))
    with pytest.raises(DataError, match=r"data\.columns names 3 columns .* but the file has 2"):
        load_dataset(DataConfig(train=str(path), header=False, columns=["a", "b", "c"]))


def test_quoted_headerless_csv_joins_title_and_description(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        for i, (t, y) in enumerate(ROWS):
            writer.writerow([1 if y == "pos" else 2, f"Title {i}", t if i != 3 else ""])
    cfg = DataConfig(train=str(path), validation=str(path), header=False, columns=["label", "title", "description"],
                     text_field=["title", "description"], label_names={1: "Positive", 2: "Negative"})
    ds = load_dataset(cfg)
    assert ds.train.texts[0] == f"Title 0 {ROWS[0][0]}"
    assert ds.train.texts[3] == "Title 3"  # an empty part leaves no stray separator
    assert ds.label_names == ["Positive", "Negative"]  # codes 1, 2 renamed, order of the codes kept
    cfg.text_join = ". "
    assert load_dataset(cfg).train.texts[0] == f"Title 0. {ROWS[0][0]}"


def test_label_names_must_cover_the_labels_exactly(tmp_path):
    path = clean_csv(tmp_path)
    with pytest.raises(DataError, match=r"\['pos'\] have no name"):
        load_dataset(DataConfig(train=str(path), label_names={"neg": "Negative"}))
    with pytest.raises(DataError, match=r"\['ngative'\] are not labels"):
        load_dataset(DataConfig(train=str(path), label_names={"ngative": "N", "pos": "P"}))


def sick_like(tmp_path):
    """A SICK-style tab-separated pairs file whose SemEval_set column names the split of each row."""
    path = tmp_path / "SICK.txt"
    rng = np.random.default_rng(0)
    sets = ["TRAIN"] * 30 + ["TRIAL"] * 6 + ["TEST"] * 10 + ["EXTRA"] * 2
    lines = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tSemEval_set"]
    for i, split in enumerate(sets):
        lines.append(f"{i}\t{ROWS[i % 40][0]}\t{ROWS[(i + 1) % 40][0]}\t{rng.uniform(1, 5):.1f}\t{split}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_splits_from_a_column(tmp_path, caplog):
    caplog.set_level(logging.INFO, "runner")
    cfg = DataConfig(type=DataType.pair, train=str(sick_like(tmp_path)), text_fields=["sentence_A", "sentence_B"],
                     label_field="relatedness_score", split_field="SemEval_set",
                     split_values={"train": "TRAIN", "validation": "TRIAL", "test": "TEST"})
    ds = load_dataset(cfg, target="score")
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (30, 6, 10)
    assert "2 rows with other values dropped ({'EXTRA': 2})" in caplog.text
    assert ds.train.columns[0][0] == ROWS[0][0] and ds.test.columns[1][0] == ROWS[37][0]
    without_validation = load_dataset(cfg, target="score", need_validation=False)  # k-fold
    assert without_validation.validation is None and len(without_validation.train) == 30


def test_split_column_errors(tmp_path):
    path = str(sick_like(tmp_path))
    base = dict(type=DataType.pair, train=path, text_fields=["sentence_A", "sentence_B"], label_field="relatedness_score",
                split_field="SemEval_set")
    with pytest.raises(DataError, match="no row has 'DEV' in column 'SemEval_set'.*'TRAIN'"):
        load_dataset(DataConfig(**base, split_values={"train": "TRAIN", "validation": "DEV"}), target="score")
    with pytest.raises(DataError, match="needs data.split_values mapping train"):
        load_dataset(DataConfig(**base, split_values={"training": "TRAIN"}), target="score")
    with pytest.raises(DataError, match="unset data.test"):
        load_dataset(DataConfig(**base, split_values={"train": "TRAIN"}, test=path), target="score")


def test_a_stray_quote_that_swallows_lines_is_an_error(tmp_path):
    lines = [f"{y}\t{t}" for t, y in ROWS]
    lines[4] = 'ham\t"Ok lar... joking'  # opens a quoted field ...
    lines[9] = 'spam\tcall now" free'  # ... that a later stray quote closes: rows 5-9 become one cell
    path = tmp_path / "sms.tsv"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(train=str(path), header=False, columns=["label", "text"])
    with pytest.raises(DataError, match=r"row 5, column 'text' runs over 6 lines .*stray quote.*data\.quoting=none"):
        load_dataset(cfg)
    cfg.quoting = "none"
    ds = load_dataset(cfg)
    assert len(ds.train) + len(ds.validation) == 40


def test_a_stray_quote_that_never_closes_is_named(tmp_path):
    lines = [f"{y}\t{t}" for t, y in ROWS]
    lines[4] = 'ham\t"Ok lar... joking'
    path = tmp_path / "sms.tsv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"opens a field that never closes.*data\.quoting=none"):
        load_dataset(DataConfig(train=str(path), header=False, columns=["label", "text"]))


def test_long_lines_fail_or_are_skipped_or_cut_and_counted(tmp_path, caplog):
    path = tmp_path / "t.tsv"
    lines = ["text\tlabel"] + [f"{t}\t{y}" + ("\tsource\textra" if i % 10 == 0 else "") for i, (t, y) in enumerate(ROWS)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 2 has 4 fields where the first has 2: set data\.bad_lines=skip"):
        load_dataset(DataConfig(train=str(path), validation=str(path)))
    caplog.set_level(logging.INFO, "runner")
    skipped = load_dataset(DataConfig(train=str(path), validation=str(path), bad_lines="skip"))
    assert len(skipped.train) == 36 and "4 lines with more fields than the first line skipped" in caplog.text
    cut = load_dataset(DataConfig(train=str(path), validation=str(path), bad_lines="truncate"))
    assert len(cut.train) == 40 and cut.train.texts[0] == ROWS[0][0] and cut.label_names == ["neg", "pos"]


def test_jsonl_rows_that_are_lists_take_column_names(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps([y, t]) + "\n" for t, y in ROWS))
    ds = load_dataset(DataConfig(train=str(path), columns=["label", "text"], header=False))
    assert len(ds.train) + len(ds.validation) == 40


def test_positive_label_chooses_the_class_of_binary_f1():
    logits = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    second = classification_metrics(logits, labels, "val")  # class 1: precision 1, recall 0.5
    first = classification_metrics(logits, labels, "val", positive=0)  # class 0: precision 2/3, recall 1
    assert second["val/precision"] == 1.0 and second["val/recall"] == 0.5
    assert first["val/precision"] == pytest.approx(2 / 3) and first["val/recall"] == 1.0


def test_shared_raw_mrpc_reads_as_it_comes(tmp_path):
    from tests.conftest import shared_data

    raw = shared_data("mrpc", "raw", "msr_paraphrase_train.txt")  # BOM, CRLF, raw quotes, a .txt extension
    ds = load_dataset(DataConfig(type=DataType.pair, train=str(raw), text_fields=["#1 String", "#2 String"],
                                 label_field="Quality", quoting="none"))
    clean = load_dataset(DataConfig(type=DataType.pair, train=str(shared_data("mrpc", "train.csv"))))
    assert len(ds.train) + len(ds.validation) == 4076
    assert sorted(ds.train.columns[0]) == sorted(clean.train.columns[0])
