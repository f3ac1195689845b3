"""The whole job with a tiny model: it learns, modes touch only what they should, outputs and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from runner import artifact, experiment, job
from runner.data import load_dataset
from runner.hardware import make_accelerator
from runner.model import load_tokenizer
from runner.spec import Run
from runner.tracking import Tracker


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A saved random tiny BERT, so tests can compare trained weights with the ones on disk."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def train(run: Run) -> experiment.FitResult:
    """fit_and_evaluate as execute calls it, without the MLflow run, returning the trained model."""
    cfg = run.cfg
    job.seed_everything(cfg.train.seed, False)
    accelerator = make_accelerator(cfg.hardware.device, cfg.precision.dtype, cfg.train.grad_accum)
    tracker = Tracker("unused", "unused", enabled=False)
    return experiment.fit_and_evaluate(run, load_dataset(cfg.data), load_tokenizer(cfg.model), accelerator, tracker,
                                       Path(cfg.output_dir))


def saved(tiny_model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_model_dir).state_dict()


def pretrained(tiny_model_dir):
    return [f"model.name_or_path={tiny_model_dir}", "model.random_init=null", "model.tokenizer=null"]


def test_tiny_model_learns_the_toy_task(make_run):
    result = train(make_run("mode=full", "train.lr=1e-2", "train.epochs=6"))
    assert result.metrics["val/accuracy"] >= 0.9
    assert result.metrics["test/accuracy"] >= 0.9
    assert result.steps == 6 * 6  # 96 rows / batch 16 = 6 steps per epoch


def test_head_only_leaves_the_encoder_bit_identical(make_run, tiny_model_dir):
    result = train(make_run("mode=head_only", "pooling=weighted", "pooling.layers=[-3,-2,-1]", *pretrained(tiny_model_dir)))
    before = saved(tiny_model_dir)
    after = result.model.encoder.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert not torch.equal(result.model.pooling.layer_logits, torch.zeros(3))  # pooling weights learned


def test_peft_changes_only_adapter_and_head_weights(make_run, tiny_model_dir):
    result = train(make_run("mode=peft", *pretrained(tiny_model_dir)))
    before = saved(tiny_model_dir)
    changed_lora = 0
    for name, tensor in result.model.encoder.state_dict().items():
        if "lora_" in name:
            changed_lora += "lora_B" in name and bool(tensor.abs().sum() > 0)  # B starts at zero
            continue
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(tensor, before[base_name]), name
    assert changed_lora > 0
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)


def test_full_with_frozen_layers_trains_only_the_top(make_run, tiny_model_dir):
    result = train(make_run("mode=full", "mode.freeze_layers=1", *pretrained(tiny_model_dir)))
    before, after = saved(tiny_model_dir), result.model.encoder.state_dict()
    for name, tensor in before.items():
        frozen = name.startswith(("embeddings.", "encoder.layer.0.", "pooler."))  # BERT's own pooler is unused
        assert torch.equal(tensor, after[name]) == frozen, name


def test_grad_accum_counts_optimizer_steps_and_max_steps_stops(make_run):
    assert train(make_run("train.grad_accum=4", "train.epochs=2")).steps == 2 * 2  # ceil(6 / 4) per epoch
    assert train(make_run("train.max_steps=5", "train.epochs=100")).steps == 5


def test_early_stopping_stops_and_keeps_the_best(make_run):
    # a learning rate this high makes validation loss worse after the first epochs
    result = train(make_run("train.lr=0.5", "train.epochs=30", "train.early_stopping.patience=2",
                            "objective.metric=val/loss", "objective.direction=minimize"))
    assert result.steps < 30 * 6
    assert result.metrics["val/loss"] == pytest.approx(result.best, rel=1e-4)  # best weights restored
    assert result.best_step <= result.steps - 2 * 6


def test_diverging_loss_fails_with_a_clear_error(make_run):
    from runner.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        train(make_run("train.lr=1e30", "train.max_grad_norm=0", "train.log_every=1", "train.epochs=3"))


def read_run(uri: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_execute_writes_outputs_and_a_finished_mlflow_run(make_run, tmp_path, toy_data):
    run = make_run("mode=full", "train.lr=1e-2", "train.epochs=6", "data.test=null")
    value = job.execute(run)
    out = Path(run.cfg.output_dir)

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["objective"] == {"metric": "val/accuracy", "value": value}
    report = json.loads((out / "report.json").read_text())
    assert report["val"]["confusion_matrix"]["labels"] == ["neg", "pos"]
    assert sum(map(sum, report["val"]["confusion_matrix"]["matrix"])) == 32

    client, mlrun = read_run(run.cfg.tracking.uri)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.metrics["val/accuracy"] == pytest.approx(value)
    assert mlrun.data.params["train.lr"] == "0.01"
    assert (mlrun.data.params["data.type"], mlrun.data.params["train.scheduler"]) == ("single", "linear")  # not DataType.single
    assert {k: mlrun.data.tags[k] for k in ("model", "mode", "pooling", "data")} == {
        "model": "tiny", "mode": "full", "pooling": "mean", "data": "csv"}
    history = client.get_metric_history(mlrun.info.run_id, "val/accuracy")
    assert history[0].step == 0 and history[-1].step == 36 and len(history) >= 7
    assert client.get_metric_history(mlrun.info.run_id, "train/loss")
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"metrics.json", "report.json", "labels.json", "config.yaml"} <= artifacts

    # the saved model is enough on its own: same predictions, label names restored
    model, tokenizer, meta = artifact.load_model(out / "model")
    texts = load_dataset(run.cfg.data).validation
    predicted = artifact.predict_labels(model, tokenizer, meta, texts.texts)
    truth = [meta["labels"][i] for i in texts.labels]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy == pytest.approx(value)
    assert meta["labels"] == ["neg", "pos"] and meta["pooling"]["_target_"] == "runner.pooling.MeanPooling"


def test_peft_model_folder_reloads_with_the_adapter(make_run):
    run = make_run("mode=peft", "pooling=cls", "train.epochs=2", "data.test=null")
    job.execute(run)
    folder = Path(run.cfg.output_dir) / "model"
    assert (folder / "adapter" / "adapter_config.json").exists() and (folder / "base").is_dir()
    model, tokenizer, meta = artifact.load_model(folder)
    assert meta["encoder"] == "adapter"
    assert len(artifact.predict_labels(model, tokenizer, meta, ["good film", "bad film"])) == 2


def test_peft_on_a_random_base_reloads_to_the_same_weights_every_time(make_run):
    run = make_run("mode=peft", "train.epochs=2", "data.test=null")
    job.execute(run)
    folder = Path(run.cfg.output_dir) / "model"
    first, tokenizer, meta = artifact.load_model(folder)
    second, _, _ = artifact.load_model(folder)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../base"  # relative: the folder can move
    from transformers import AutoModel
    with torch.no_grad():  # the saved base is the plain encoder: no LoRA layers, no missing weights
        plain = AutoModel.from_pretrained(folder / "base")
        assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())


def test_peft_on_a_local_base_keeps_the_base_in_the_folder(make_run, tiny_model_dir, tmp_path):
    """A saved folder never points outside itself (runner.trust): a local base model's weights go in base/,
    and the folder predicts the same after it moves and the original base is gone."""
    import shutil

    local = shutil.copytree(tiny_model_dir, tmp_path / "local-base")
    run = make_run("mode=peft", "train.epochs=1", "data.test=null", *pretrained(str(local)))
    job.execute(run)
    folder = Path(run.cfg.output_dir) / "model"
    meta = json.loads((folder / "runner_model.json").read_text())
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"] == "base" and config["base_model_name_or_path"] == "../base"
    model, tokenizer, loaded = artifact.load_model(folder)
    before = artifact.predict_labels(model, tokenizer, loaded, ["good film", "bad plot"])
    moved = shutil.move(str(folder), str(tmp_path / "elsewhere"))
    shutil.rmtree(local)
    model, tokenizer, loaded = artifact.load_model(moved)
    assert artifact.predict_labels(model, tokenizer, loaded, ["good film", "bad plot"]) == before


def test_the_packaged_minilm_is_referred_to_by_its_hub_id(tmp_path):
    from runner.schema import ModelConfig

    path = artifact.packaged_path("sentence-transformers/all-MiniLM-L6-v2")
    reference = artifact.base_reference(ModelConfig(name_or_path=str(path)), tmp_path / "model")
    assert reference == "sentence-transformers/all-MiniLM-L6-v2"  # never the site-packages path
    assert Path(artifact.resolve_base(reference, tmp_path / "model")) == path  # found offline when installed


def test_a_bad_input_opens_no_mlflow_run(make_run):
    run = make_run("objective.metric=val/nope")
    with pytest.raises(Exception, match="objective.metric=val/nope is not a metric"):
        job.execute(run)
    client = mlflow.MlflowClient(tracking_uri=run.cfg.tracking.uri)
    experiment = client.get_experiment_by_name("test")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_a_job_failing_while_training_is_marked_failed_with_its_error(make_run):
    run = make_run("train.lr=1e30", "train.max_grad_norm=0", "train.log_every=1")
    with pytest.raises(Exception, match="lower train.lr"):
        job.execute(run)
    _, mlrun = read_run(run.cfg.tracking.uri)
    assert mlrun.info.status == "FAILED"
    assert mlrun.data.tags["error"].startswith("TrainingDiverged: loss is")


def test_pooling_layers_out_of_range_is_a_clear_error(make_run):
    from runner.errors import RunnerError

    with pytest.raises(RunnerError, match=r"pooling.layers=\[-4, -3, -2, -1\] but this encoder has 3 hidden states"):
        train(make_run("pooling=weighted"))
