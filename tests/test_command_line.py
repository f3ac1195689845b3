"""The command line a user meets: --help, raw files straight from the shell, conf/experiment and
conf/debug overlays, trackers beside MLflow, and job-numbered log lines in sweeps."""

from __future__ import annotations

import csv
import json
import sqlite3
import struct
from pathlib import Path

import pytest

from runner import cli
from runner.run import CONF_DIR
from tests.conftest import compose_config, make_sentences, run_cli

ROWS = make_sentences(60, 0, labels=("pos", "neg"))


@pytest.fixture
def base(tmp_path, tokenizer_dir, monkeypatch) -> list[str]:
    """A tiny model, a few steps, no MLflow: what matters here is that the data reads and the job runs."""
    monkeypatch.chdir(tmp_path)
    return ["model=tiny", f"model.tokenizer={tokenizer_dir}", "data=csv", "hardware=cpu", "precision=fp32",
            "train.max_steps=3", "train.batch_size=8", "train.progress=false", "tracking.enabled=false",
            "save_model=false", f"cache.dir={tmp_path / 'cache'}"]


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_help_is_the_runners_own(capsys):
    code, out = run_cli(["--help"], capsys)
    assert code == 0
    assert out.startswith("runner: fine-tune and evaluate text encoders")
    for group in ("model ", "pooling ", "mode ", "data ", "experiment ", "debug ", "hparams_search "):
        assert f"\n  {group}" in out
    assert "sst2_peft" in out and "smoke, overfit" in out.replace("overfit, smoke", "smoke, overfit")
    assert "schema" not in out  # the internal typed schemas are not options
    assert "python -m runner -m hparams_search=head_lr" in out and "outputs/runs/<date>/<time>/" in out
    assert "--shell-completion" in out  # Hydra's flags stay documented


def test_raw_characters_are_quoted_for_hydra():
    assert cli.quote_raw_values(["data.delimiter=;", "data.delimiter=|", "data.text_join=. ", "model=tiny"]) == [
        "data.delimiter=';'", "data.delimiter='|'", "data.text_join='. '", "model=tiny"]
    assert cli.quote_raw_values(["data.delimiter=';'", "+data.delimiter=\\t"]) == ["data.delimiter=';'", "+data.delimiter='\\\\t'"]


def test_headerless_semicolon_txt_from_the_shell(base, tmp_path, capsys):
    """data.train=train.txt data.delimiter=';' data.header=false data.columns=[text,label]: the shell has
    already removed the quotes, so Hydra would see data.delimiter=; and refuse it."""
    (tmp_path / "train.txt").write_text("".join(f"{t};{y}\n" for t, y in ROWS))
    code, out = run_cli([*base, "data.train=train.txt", "data.delimiter=;", "data.header=false",
                         "data.columns=[text,label]", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    assert "data.train: 60 rows read from train.txt" in out
    assert "val/accuracy" in metrics_of(tmp_path / "run")["metrics"]


def test_label_tab_text_with_five_folds(base, tmp_path, capsys):
    (tmp_path / "SMSSpamCollection").write_text("".join(f"{'spam' if y == 'pos' else 'ham'}\t{t}\n" for t, y in ROWS))
    code, out = run_cli([*base, "data.train=SMSSpamCollection", "data.header=false", "data.columns=[label,text]",
                         "cv.folds=5", "task.positive_label=spam", "objective.metric=val/f1", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    assert "it looks tab-separated (data.delimiter=tab)" in out
    summary = metrics_of(tmp_path / "run")
    assert len(summary["folds"]) == 5 and "val/f1" in summary["folds"][0]


def test_quoted_headerless_csv_with_title_and_description(base, tmp_path, capsys):
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        for i, (t, y) in enumerate(ROWS):
            writer.writerow([1 if y == "pos" else 2, f"story {i}", t])
    code, out = run_cli([*base, "data.train=train.csv", "data.header=false", "data.columns=[label,title,description]",
                         "data.text_field=[title,description]", "data.label_names={1: Good, 2: Bad}",
                         "save_model=true", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    meta = json.loads((tmp_path / "run" / "model" / "runner_model.json").read_text())
    assert meta["labels"] == ["Good", "Bad"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["val"]["per_class"]) >= {"Good", "Bad"}


def test_pairs_file_with_a_split_column_in_one_run(base, tmp_path, capsys):
    lines = ["pair_ID\tsentence_A\tsentence_B\tentailment_judgment\tSemEval_set"]
    sets = ["TRAIN"] * 40 + ["TRIAL"] * 10 + ["TEST"] * 10
    for i, split in enumerate(sets):
        lines.append(f"{i}\t{ROWS[i][0]}\t{ROWS[(i + 7) % 60][0]}\t{ROWS[i][1]}\t{split}")
    (tmp_path / "SICK.txt").write_text("\n".join(lines) + "\n")
    code, out = run_cli([*base, "data.train=SICK.txt", "data.type=pair", "data.text_fields=[sentence_A,sentence_B]",
                         "data.label_field=entailment_judgment", "data.split_field=SemEval_set",
                         "data.split_values={train: TRAIN, validation: TRIAL, test: TEST}", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    assert "train 40 (TRAIN), validation 10 (TRIAL), test 10 (TEST)" in out
    assert "data: 40 train, 10 validation, 10 test" in out
    assert "test/accuracy" in metrics_of(tmp_path / "run")["metrics"]


OVERLAYS = sorted(p.relative_to(CONF_DIR).with_suffix("").as_posix() for group in ("experiment", "debug")
                  for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_composes(overlay):
    group, name = overlay.split("/")
    cfg = compose_config([f"{group}={name}"], with_hydra=True)
    first = (Path(CONF_DIR) / f"{overlay}.yaml").read_text().splitlines()
    assert first[1].startswith(f"# python -m runner {group}={name}")  # each file opens with its command
    if group == "experiment":
        assert cfg.tracking.experiment == name
    if name == "trec_kfold_search":
        assert str(cfg.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN") and cfg.cv.folds == 3


def test_debug_smoke_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["debug=smoke", "hardware=cpu", "hydra.run.dir=run", f"cache.dir={tmp_path / 'cache'}"], capsys)
    assert code == 0, out
    assert "step 4: val/accuracy" in out and not (tmp_path / "outputs" / "mlflow.db").exists()


def test_debug_overfit_drives_the_training_loss_down(base, tmp_path, capsys, toy_data):
    code, out = run_cli([*base, "debug=overfit", f"data.train={toy_data['train']}", "train.max_steps=-1",
                         "train.lr=1e-3", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    losses = [float(line.split("train/loss=")[1].split()[0]) for line in out.splitlines() if "train/loss=" in line]
    assert losses and losses[-1] < 0.1 < losses[0]


@pytest.mark.parametrize("experiment", ["sst2_peft", "stsb_bi"])
def test_experiments_run_on_local_files(base, tmp_path, capsys, experiment, toy_data):
    if experiment == "stsb_bi":
        rows = "".join(f"{t},{ROWS[(i + 3) % 60][0]},{i % 6}\n" for i, (t, _) in enumerate(ROWS))
        (tmp_path / "pairs.csv").write_text("sentence1,sentence2,score\n" + rows)
        data = ["data.train=pairs.csv", "data.validation=pairs.csv", "data.test=null"]
    else:
        data = [f"data.train={toy_data['train']}", f"data.validation={toy_data['validation']}",
                "data.text_field=text", "data.label_field=label"]
    preset = [o for o in base if o != "data=csv"]  # the experiment's own data preset, on local files
    code, out = run_cli([f"experiment={experiment}", *preset, *data, "data.hub=null", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    assert metrics_of(tmp_path / "run")["objective"]["metric"] in ("val/accuracy", "val/spearman")


def mlflow_history(db: Path) -> dict[str, list[tuple[int, float]]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select key, step, value from metrics order by key, step").fetchall()
    out: dict[str, list[tuple[int, float]]] = {}
    for key, step, value in rows:
        out.setdefault(key, []).append((step, value))
    return out


def test_tensorboard_gets_the_same_metrics_as_mlflow(base, tmp_path, capsys, toy_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracked = [o for o in base if not o.startswith("tracking.")]
    code, out = run_cli([*tracked, f"data.train={toy_data['train']}", f"data.validation={toy_data['validation']}",
                         "train.max_steps=6", "train.eval_every=3", "train.log_every=2",
                         "tracking.backends=[mlflow,tensorboard]", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                         "hydra.run.dir=run"], capsys)
    assert code == 0, out
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    board = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    flow = mlflow_history(tmp_path / "mlflow.db")
    assert set(board) == set(flow) and {"train/loss", "val/accuracy"} <= set(board)
    for key, points in flow.items():
        assert [s for s, _ in board[key]] == [s for s, _ in points]
        assert [v for _, v in board[key]] == pytest.approx([v for _, v in points], rel=1e-6)
    assert "params/text_summary" in events.Tags()["tensors"]


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file: a 7-byte header, then the LevelDB log format (32 KiB blocks of
    records with a 7-byte header: checksum, length, type full/first/middle/last)."""
    data, pos, block, records, pending = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def test_wandb_offline_gets_the_same_metrics_as_mlflow(base, tmp_path, capsys, toy_data, monkeypatch):
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracked = [o for o in base if not o.startswith("tracking.")]
    code, out = run_cli([*tracked, f"data.train={toy_data['train']}", f"data.validation={toy_data['validation']}",
                         "train.max_steps=4", "train.log_every=2", "tracking.backends=[mlflow,wandb]",
                         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    [record_file] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    logged: dict[str, list[tuple[int, float]]] = {}
    config = {}
    for data in wandb_records(record_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    logged.setdefault(key, []).append((int(items["_step"]), value))
        if record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    flow = mlflow_history(tmp_path / "mlflow.db")
    assert set(logged) == set(flow) and "train/loss" in logged
    for key, points in flow.items():
        assert [s for s, _ in logged[key]] == [s for s, _ in points]
        assert [v for _, v in logged[key]] == pytest.approx([v for _, v in points], rel=1e-6)
    assert config["train.lr"] == "5e-05" and config["data.header"] == "True"  # the same params as MLflow


def test_sweep_jobs_prefix_their_log_lines(base, tmp_path, capsys, toy_data):
    code, out = run_cli(["-m", *base, f"data.train={toy_data['train']}", f"data.validation={toy_data['validation']}",
                         "train.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys)
    assert code == 0, out
    assert "[job 0] objective val/accuracy" in out and "[job 1] objective val/accuracy" in out
    assert cli.job_prefix("RunMode.RUN", 0) == "" and cli.job_prefix("MULTIRUN", 3) == "[job 3] "
