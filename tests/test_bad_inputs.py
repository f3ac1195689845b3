"""A catalog of bad inputs, tried as a new user would: each is one clear message and a non-zero exit,
and leaves nothing half-done (no run folder of a run that did no work, no MLflow run).

Each case runs ``python -m runner`` in-process (Hydra's real entry point, argv and all) on the tiny
model and the toy data, from a fresh working directory.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.conftest import make_sentences, run_cli, write_csv


def mlflow_runs(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        return con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0


@pytest.fixture
def base(tmp_path, tokenizer_dir, toy_data, monkeypatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    return ["model=tiny", f"model.tokenizer={tokenizer_dir}", "data=csv", f"data.train={toy_data['train']}",
            f"data.validation={toy_data['validation']}", "hardware=cpu", "precision=fp32", "train.epochs=1",
            "train.progress=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def loose_folder(tmp_path: Path) -> Path:
    """A folder of files without class subfolders: not a layout the runner reads."""
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "notes.txt").write_text("a text\n")
    return tmp_path / "loose"


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def three_classes(tmp):
    rows = make_sentences(60, 0, labels=("pos", "neg", "meh"))
    return [f"data.train={write_csv(tmp / 'three.csv', rows)}", "data.validation=null"]


def one_class(tmp):
    return [f"data.train={write(tmp, 'one.csv', 'text,label' + chr(10) + 'good film,pos' + chr(10) * 1 + 'nice plot,pos' + chr(10))}",
            "data.validation=null"]


def scores(tmp, bad: str):
    rows = "".join(f"good film {i},{i % 5}\n" for i in range(20)) + f"bad film,{bad}\n"
    return [f"data.train={write(tmp, 'scores.csv', 'text,score' + chr(10) + rows)}", "data.validation=null",
            "data.label_field=score", "task.target=score", "task.score_range=[0,5]", "objective.metric=val/spearman"]


def triplets(tmp):
    rows = "\n".join('{"anchor": "good film", "positive": "nice plot", "negative": "bad film"}' for _ in range(8))
    return [f"data.train={write(tmp, 't.jsonl', rows)}", "data.validation=null", "data.type=triplet",
            "objective.metric=val/mrr_at_10"]


def no_tokenizer_folder(tmp):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp / "bare")
    return [f"model.name_or_path={tmp / 'bare'}", "model.random_init=null", "model.tokenizer=null"]


def finished_run(tmp):
    (tmp / "fixed").mkdir()
    (tmp / "fixed" / "metrics.json").write_text("{}")
    return ["hydra.run.dir=fixed"]


def small_vocabulary_model(tmp):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=10, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp / "small")
    return [f"model.name_or_path={tmp / 'small'}", "model.random_init=null"]


def pickle_only_model(tmp):
    import torch
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64))
    model.save_pretrained(tmp / "old")
    (tmp / "old" / "model.safetensors").unlink()  # as models saved before safetensors were: a pickle
    torch.save(model.state_dict(), tmp / "old" / "pytorch_model.bin")
    return [f"model.name_or_path={tmp / 'old'}", "model.random_init=null"]


def labels_with(tmp, cell: str):
    rows = [f"{t},{label}" for t, label in make_sentences(40, 0)]
    rows[6] = rows[6].rsplit(",", 1)[0] + "," + cell
    return [f"data.train={write(tmp, 'gaps.csv', 'text,label' + chr(10) + chr(10).join(rows) + chr(10))}",
            "data.validation=null"]


def a_file(tmp, name="afile"):
    (tmp / name).write_text("x")
    return tmp / name


CASES = [
    # --- config: composition (Hydra's messages name the key) ---
    ("unknown option", ["pooling=nope"], "Could not find 'pooling/nope'", 1),
    ("wrong type", ["train.lr=abc"], "Value 'abc' of type 'str' could not be converted to Float", 1),
    ("misspelled key with +", ["+train.learning_rate=1e-3"], "unknown key train.learning_rate (did you mean train.lr?)", 1),
    ("near-miss key with +", ["+train.epoch=3"], "unknown key train.epoch (did you mean train.epochs?)", 1),
    ("unknown key in a group", ["+model.foo=1"], "unknown key model.foo (known keys: image_processor, locked, max_length, "
     "name_or_path, padding_side, projection_dim, random_init, revision, text_padding, text_prefix, tokenizer, "
     "trust_remote_code, vision_init)", 1),
    ("loss key without a loss", ["+loss.typo=1"], "loss.typo is set but no loss is chosen (loss=null uses the task's default): "
     "pick one first, e.g. loss=ce, loss=focal or loss=mnrl", 1),
    ("unknown loss key", ["loss=ce", "+loss.typo=1"], "unknown key loss.typo (known keys: _target_, class_weights, label_smoothing)", 1),
    ("mistyped loss value", ["loss=focal", "loss.gamma=abc"], "full_key: loss.gamma", 1),
    ("loss key of no loss", ["loss.margin=abc"], "Could not override 'loss.margin'.", 1),
    ("loss enum", ["loss=triplet", "loss.distance=manhattan"], "Invalid value 'manhattan', expected one of [cosine, euclidean]", 1),
    ("padding side enum", ["model.padding_side=middle"], "Invalid value 'middle', expected one of [left, right]", 1),
    ("similarity enum", ["task.similarity=l2"], "Invalid value 'l2', expected one of [cosine, dot]", 1),
    ("distill enum", ["distill.embedding_loss=l1"], "Invalid value 'l1', expected one of [mse, cosine]", 1),
    # --- config: values ---
    ("negative lr", ["train.lr=-1"], "train.lr=-1.0 must be a positive number", 1),
    ("batch size 0", ["train.batch_size=0"], "train.batch_size=0 must be at least 1", 1),
    ("warmup ratio", ["train.warmup_ratio=1.5"], "train.warmup_ratio=1.5 must be in [0, 1)", 1),
    ("one fold", ["cv.folds=1"], "cv.folds=1 must be 0 (off) or at least 2", 1),
    ("keep no checkpoint", ["train.keep_checkpoints=0"], "train.keep_checkpoints=0 must be at least 1", 1),
    ("reversed score range", ["task.score_range=[5,0]"], "task.score_range=[5.0, 0.0] must be two increasing numbers, e.g. [0, 5]", 1),
    ("one-number score range", ["task.score_range=[5]"], "task.score_range=[5.0] must be two increasing numbers, e.g. [0, 5]", 1),
    ("threshold", ["task.threshold=1.5"], "task.threshold=1.5 must be in (0, 1)", 1),
    ("distill alpha", ["distill.alpha=2"], "distill.alpha=2.0 must be in [0, 1]", 1),
    ("max_steps 0", ["train.max_steps=0"], "train.max_steps=0 must be -1 (use epochs) or at least 1", 1),
    ("objective of another task", three_classes, None, 1),  # filled below: val/f1 on three classes
    ("unknown objective", ["objective.metric=val/nope"], "objective.metric=val/nope is not a metric of this run; choose one "
     "of val/accuracy, val/f1_macro, val/f1_micro, val/precision_macro, val/recall_macro, val/mcc, val/loss, val/f1", 1),
    ("loss for other outputs", ["loss=mnrl"], "loss MultipleNegativesRanking works on triplet outputs, but this run (single "
     "data, task.architecture=cross) trains on logits: pick a matching loss", 1),
    ("head_only embedding model", lambda t: [*triplets(t), "mode=head_only"], "mode=head_only freezes the encoder, and this "
     "embedding model (triplet data, no head) has nothing else to train: use mode=full or mode=peft, or pooling=weighted "
     "(learned layer weights)", 1),
    ("fp16 on cpu", ["precision=fp16"], "precision=fp16 needs a GPU; on CPU use precision=bf16 or precision=fp32", 1),
    ("gpu without one", ["hardware=gpu"], "hardware=gpu but no CUDA GPU is visible; use hardware=cpu or hardware=auto", 1),
    # --- model ---
    ("LoRA targets match nothing", ["mode=peft", "mode.target_modules=[qkv,out_proj]"], "mode.target_modules: ['qkv', "
     "'out_proj'] match no linear layer of this bert; its linear layers are ['dense', 'key', 'query', 'value']", 1),
    ("LoRA rank 0", ["mode=peft", "mode.r=0"], "mode: r=0 must be at least 1, alpha=16 positive, dropout=0.1 in [0, 1)", 1),
    ("freeze more layers than exist", ["mode.freeze_layers=5"], "mode.freeze_layers=5 but the encoder has 2 layers", 1),
    ("max_length past the positions", ["model.max_length=1000"], "model.max_length=1000 but this encoder takes at most 128 "
     "tokens: set model.max_length to 128 or less", 1),
    ("pooling layers out of range", ["pooling=weighted"], "pooling.layers=[-4, -3, -2, -1] but this encoder has 3 hidden "
     "states (embeddings + 2 layers): use indices from -3 to 2", 1),
    ("model path that does not exist", ["model.name_or_path=./no/such/model", "model.random_init=null"],
     "model.name_or_path=./no/such/model: no such folder", 1),
    ("model folder without tokenizer", no_tokenizer_folder, "has no vocabulary (only 5 special tokens): the folder lacks "
     "tokenizer files; set model.tokenizer to a folder or hub id that has them", 1),
    # --- data ---
    ("missing train file", ["data.train=nope.csv"], "data.train: file not found: nope.csv", 1),
    ("single class", one_class, "a single class ('pos' in column 'label'): a classifier needs at least two; check "
     "data.label_field", 1),
    ("single class after max_train_samples", ["data.max_train_samples=1"], "its first 1 rows (data.max_train_samples) have a "
     "single class", 1),
    ("NaN score", lambda t: scores(t, "nan"), "scores.csv: 1 rows have no label in column 'score' (empty, NaN, NA, null "
     "or None; rows 22)", 1),
    ("inf score", lambda t: scores(t, "inf"), "row 22, column 'score': score 'inf' is not a finite number", 1),
    ("score outside the range", lambda t: scores(t, "7"), "row 22, column 'score': score 7 is outside task.score_range=[0, 5]", 1),
    ("wrong encoding", lambda t: [f"data.train={write(t, 'latin.csv', 'text,label' + chr(10) + 'good,pos' + chr(10) + 'café bad,neg' + chr(10), 'latin-1')}"],
     "latin.csv: byte 23 (line 3) is not valid utf-8 (b'\\xe9'); it looks like cp1252: set data.encoding=cp1252 (or data.encoding=auto", 1),
    ("missing text column", ["data.text_field=sentence"], "no column 'sentence' (data.text_field)", 1),
    ("empty file", lambda t: [f"data.train={write(t, 'empty.csv', '')}"], "empty.csv is empty", 1),
    ("validation label unseen in train", lambda t: [f"data.validation={write(t, 'v.csv', 'text,label' + chr(10) + 'x,zzz' + chr(10))}"],
     "row 2, column 'label': label 'zzz' does not occur in the training data", 1),
    ("more folds than rows", ["cv.folds=500"], "cv.folds=500: needs 2 <= folds <= the 96 training rows", 1),
    ("only_fold out of range", ["cv.folds=3", "cv.only_fold=7"], "cv.only_fold=7 must be in 0..2", 1),
    # --- run folder, resume and tracking ---
    ("finished run folder", finished_run, "holds a finished run (metrics.json): choose another hydra.run.dir, or add "
     "overwrite=true to replace it", 1),
    ("unwritable run folder", lambda t: [f"hydra.run.dir={a_file(t)}/run"], "cannot write to the run folder", 1),
    ("unwritable tracking store", lambda t: [f"tracking.uri=sqlite:///{a_file(t, 'store')}/mlflow.db"],
     "mlflow.db is not writable (File exists): set tracking.uri to a writable place, or tracking.enabled=false", 1),
    ("one checkpoint for k folds", lambda t: ["cv.folds=2", f"train.resume={a_file(t).parent}"], "names one "
     "checkpoint, but a k-fold job has one per fold: give the run folder of the interrupted job instead", 1),
    # --- issue 19: wrong results that exited 0, tracebacks, misleading hints ---
    ("NaN label cell", lambda t: labels_with(t, "NaN"), "gaps.csv: 1 rows have no label in column 'label' (empty, NaN, NA, "
     "null or None; rows 8): fill them in, or drop them with data.missing_labels=drop", 1),
    ("None label cell", lambda t: labels_with(t, "None"), "rows 8): fill them in", 1),
    ("NA label cell", lambda t: labels_with(t, " NA "), "rows 8): fill them in", 1),
    ("missing_labels value", ["data.missing_labels=keep"], "data.missing_labels=keep must be error or drop", 1),
    ("random_init and a path", ["model.name_or_path=sentence-transformers/all-MiniLM-L6-v2"],
     "model.name_or_path=sentence-transformers/all-MiniLM-L6-v2 and model.random_init are both set (a preset such as "
     "model=tiny sets random_init): to train those weights add model.random_init=null", 1),
    ("tokenizer larger than the embeddings", small_vocabulary_model, "tokens but the encoder", 1),
    ("pickle-only model folder", pickle_only_model, "the model weights are pickle files (pytorch_model.bin), which can "
     "run code when loaded; the runner reads safetensors only", 1),
    ("a folder without class folders as data.train", lambda t: [f"data.train={loose_folder(t)}"], "loose: a folder of files without class folders carries no labels: put the files in one subfolder per class", 1),
    ("missing distillation teacher", ["distill.teacher=./no/such/teacher"], "distill.teacher=./no/such/teacher: no such "
     "folder", 1),
    ("misspelled key without +", ["train.learning_rate=1e-3"], "unknown key train.learning_rate (did you mean train.lr?)", 1),
    ("key by another library's name", ["data.text_column=sentence"], "unknown key data.text_column (did you mean "
     "data.text_field?)", 1),
    ("the same with +", ["+data.text_column=sentence"], "unknown key data.text_column (did you mean data.text_field?)", 1),
    ("a binary file", lambda t: [f"data.train={write(t, 'sheet.csv', 'PK' + chr(3) + chr(4) + 'xl/workbook')}"],
     "sheet.csv looks like a zip archive (or an .xlsx/.docx file): give a text table", 1),
    ("NUL bytes", lambda t: [f"data.train={write(t, 'nul.csv', 'text,label' + chr(10) + 'a' + chr(0) + ',pos' + chr(10))}"],
     "nul.csv looks binary (it holds NUL bytes), not text", 1),
    ("one-column file", lambda t: [f"data.train={write(t, 'lines.csv', 'review' + chr(10) + 'good film' + chr(10))}"],
     "the file has a single column: a labelled file needs a text and a label column", 1),
    ("local model path taken as a hub id", ["model.name_or_path=models/mine", "model.random_init=null"],
     "could not load the model 'models/mine' (no folder", 1),
    ("resume from nothing", ["train.resume=no/such/checkpoint"], "train.resume=no/such/checkpoint: no such folder; give a "
     "checkpoint folder, auto or never", 1),
]


@pytest.mark.parametrize("name,args,message,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, args, message, code, base, tmp_path, capsys):
    extra = args(tmp_path) if callable(args) else args
    if name == "objective of another task":
        extra, message = [*extra, "objective.metric=val/f1"], ("objective.metric=val/f1 is not a metric of this run; "
                                                                "choose one of val/accuracy, val/f1_macro")
    got, out = run_cli([*base, *extra], capsys)
    assert got == code, out
    assert message in out, out
    assert "Traceback" not in out
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not list(runs.glob("*/*")), "a run that did no work left its folder"
    assert mlflow_runs(tmp_path / "mlflow.db") == 0, "a bad input opened an MLflow run"


def test_the_catalog_is_long_enough():
    assert len(CASES) >= 55


def test_hydra_would_have_said_use_plus(base, capsys):
    """Hydra's own advice for an unknown key is "use +key", which the runner then refuses: its words are gone."""
    code, out = run_cli([*base, "train.learning_rate=1e-3"], capsys)
    assert code == 1 and "+train.learning_rate" not in out and "append" not in out


def test_wandb_without_a_key_is_one_line_before_any_run(base, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never logged in
    code, out = run_cli([*base, "tracking.backends=[mlflow,wandb]"], capsys)
    assert code == 1 and "wandb: no API key: run `wandb login` or set WANDB_MODE=offline" in out
    assert "Traceback" not in out and mlflow_runs(tmp_path / "mlflow.db") == 0


def test_missing_labels_can_be_dropped_and_are_counted(base, tmp_path, capsys):
    code, out = run_cli([*base, *labels_with(tmp_path, "null"), "data.missing_labels=drop", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    assert "1 rows without a label in column 'label' dropped (data.missing_labels=drop; rows 8)" in out
    assert "data: 35 train" in out  # 39 rows less the dropped one, less the 10% validation split


def test_a_class_seen_once_is_a_warning(base, tmp_path, capsys):
    rows = make_sentences(40, 0) + [("the film was odd", "odd")]
    train = write_csv(tmp_path / "rare.csv", rows)
    code, out = run_cli([*base, f"data.train={train}", "data.validation=null", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    assert "1 classes occur in fewer than 2 training rows ('odd')" in out
    assert "classes occur in fewer than 2" in (tmp_path / "run" / "runner.log").read_text()


def test_a_model_that_diverged_after_its_last_logged_loss_is_not_saved():
    """The final check: non-finite metrics or weights end the run (exit 3) before anything is saved."""
    import torch

    from runner.errors import TrainingDiverged
    from runner.experiment import check_finite

    model = torch.nn.Linear(2, 2)
    check_finite({"val/accuracy": 0.5}, model, 3)
    with pytest.raises(TrainingDiverged, match="val/loss is not finite after step 3"):
        check_finite({"val/loss": float("nan"), "val/accuracy": 0.5}, model, 3)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="weight weight holds NaN or infinite values after step 3"):
        check_finite({"val/accuracy": 0.5}, model, 3)
    assert TrainingDiverged.exit_code == 3


def test_labels_that_differ_only_in_spaces_are_one_class(base, tmp_path, capsys):
    rows = [(t, f" {label} " if i % 3 == 0 else label) for i, (t, label) in enumerate(make_sentences(60, 0))]
    train = write_csv(tmp_path / "spaces.csv", rows)
    code, out = run_cli([*base, f"data.train={train}", "data.validation=null", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    assert "2 labels" in out
    assert (tmp_path / "run" / "labels.json").read_text() == '["neg", "pos"]'


def test_cfg_job_resolve_prints_the_config(base, capsys):
    code, out = run_cli([*base, "--cfg", "job", "--resolve"], capsys)
    assert code == 0 and "Traceback" not in out
    assert "output_dir: null" in out and "lr: 5.0e-05" in out


def test_a_run_uploads_its_log_to_mlflow(base, tmp_path, capsys):
    import mlflow

    code, out = run_cli([*base, "hydra.run.dir=run"], capsys)
    assert code == 0, out
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert "runner.log" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_run_diverging_at_its_last_step_exits_3_and_saves_no_model(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RUNNER_NAN_AT", "0:3")  # the loss of optimizer step 3 (of 3) becomes NaN
    code, out = run_cli([*base, "train.batch_size=32", "hydra.run.dir=run"], capsys)
    assert code == 3, out
    assert "at step 3" in out and "Traceback" not in out
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "metrics.json").exists()
