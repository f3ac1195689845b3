"""Shared fixtures: offline mode, a generated tokenizer, tiny labelled data, the real composed config."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails loudly instead of hanging
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv
import random
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import runner.schema  # noqa: F401  (registers schemas and resolvers)
from runner.run import CONF_DIR, build_run, main

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

POSITIVE = ["good", "great", "nice"]
NEGATIVE = ["bad", "awful", "poor"]
FILLER = ["the", "movie", "was", "very", "really", "quite", "plot", "and", "a", "story", "film", "acting"]


def shared_data(*parts: str) -> Path:
    """A file of ../shared/data, or skip: that folder exists beside CI and developer checkouts only."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real-data tests need ../shared/data beside the checkout")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A small WordPiece (BERT) tokenizer generated from the test vocabulary."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER, "neutral", "meh", "."]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    return str(folder)


def make_sentences(n: int, seed: int, labels=("pos", "neg")) -> list[tuple[str, str]]:
    """Sentences of random length whose label is given by one sentiment word in them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        word = rng.choice(POSITIVE if label in ("pos", 1, "1") else NEGATIVE if label in ("neg", 0, "0") else ["neutral", "meh"])
        filler = [rng.choice(FILLER) for _ in range(rng.randint(1, 12))]
        filler.insert(rng.randint(0, len(filler)), word)
        rows.append((" ".join(filler), label))
    return rows


def multi_label_rows(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Texts tagged pos, neg or both ("pos,neg"): the tags are the sentiment words in them."""
    out = []
    for _ in range(n):
        tags = rng.choice([["pos"], ["neg"], ["pos", "neg"]])
        words = [rng.choice(POSITIVE if t == "pos" else NEGATIVE) for t in tags] + ["the", "film"]
        rng.shuffle(words)
        out.append((" ".join(words), ",".join(tags)))
    return out


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def triplet_sentence(rng: random.Random, positive: bool) -> str:
    return " ".join([rng.choice(["the", "a"]), rng.choice(["film", "movie", "plot"]), "was",
                     rng.choice(POSITIVE if positive else NEGATIVE)])


def write_triplets(path: Path, n: int, seed: int) -> str:
    """anchor / positive (same sentiment) / negative (the other) rows as jsonl."""
    import json

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        rows.append({"anchor": triplet_sentence(rng, pos), "positive": triplet_sentence(rng, pos),
                     "negative": triplet_sentence(rng, not pos)})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture
def toy_data(tmp_path) -> dict[str, str]:
    """Train (96 rows), validation (32) and test (32) CSVs of a learnable two-class task."""
    return {
        "train": str(write_csv(tmp_path / "train.csv", make_sentences(96, 0))),
        "validation": str(write_csv(tmp_path / "dev.csv", make_sentences(32, 1))),
        "test": str(write_csv(tmp_path / "test.csv", make_sentences(32, 2))),
    }


def compose_config(overrides: list[str], with_hydra: bool = False):
    """The real config from conf/, composed with ``overrides``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, job_name="test"):
        return compose("config", overrides=overrides, return_hydra_config=with_hydra)


@pytest.fixture
def tiny_overrides(tmp_path, tokenizer_dir, toy_data) -> list[str]:
    """Overrides for a fast, offline, fully local run of the tiny model on the toy data."""
    return [
        "model=tiny",
        f"model.tokenizer={tokenizer_dir}",
        "data=csv",
        f"data.train={toy_data['train']}",
        f"data.validation={toy_data['validation']}",
        f"data.test={toy_data['test']}",
        "hardware=cpu",
        "precision=fp32",
        "train.epochs=4",
        "train.batch_size=16",
        "train.progress=false",
        f"output_dir={tmp_path / 'run'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=test",
        f"cache.dir={tmp_path / 'cache'}",
        "tracking.log_model=false",  # the pyfunc copy of the model is tested where it matters (test_mlflow_model.py)
    ]


@pytest.fixture
def make_run(tiny_overrides):
    """Build the typed Run for the tiny setup plus extra overrides, as ``python -m runner`` would."""

    def build(*extra: str):
        cfg = compose_config([*tiny_overrides, *extra], with_hydra=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        return build_run(cfg, choices)

    return build


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    sys.argv = ["runner", *args]
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(autouse=True)
def drop_stale_log_handlers():
    """An in-process Hydra run leaves its console handler on the root logger, writing to the stream that
    pytest captured for that test; later log lines would hit a closed stream. Drop them after each test."""
    yield
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()

