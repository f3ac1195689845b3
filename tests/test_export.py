"""ONNX export of every task x pooling (LoRA merged first) against PyTorch, merged LoRA folders that
load without peft, and bad export input."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from runner import pooling as poolings
from runner.artifact import save_model
from runner.export import export_merged, export_onnx
from runner.model import TextModel
from runner.predict import Predictor
from tests.conftest import FILLER, NEGATIVE, POSITIVE

POOLINGS = {"mean": poolings.MeanPooling(normalize=True), "cls": poolings.ClsPooling(), "max": poolings.MaxPooling(),
            "lasttoken": poolings.LastTokenPooling(), "weighted": poolings.WeightedLayerPooling(layers=[-3, -2, -1])}
TASKS = {  # task settings as save_trained records them, and the head size
    "classifier": ({"task": "Classify", "data_type": "single", "joint": False}, 3),
    "cross-encoder": ({"task": "Regress", "data_type": "pair", "joint": True, "score_range": [0, 5]}, 1),
    "bi-encoder": ({"task": "PairSimilarity", "data_type": "pair", "joint": False, "similarity": "cosine"}, None),
}


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = POSITIVE + NEGATIVE + FILLER
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def tiny_model(tokenizer, pooling, outputs, lora: bool = False) -> TextModel:
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    encoder = AutoModel.from_config(config)
    if lora:
        from runner.modes import Lora

        encoder = Lora(r=4).apply(encoder)
        for name, weights in encoder.named_parameters():  # a trained adapter: B is not zero
            if "lora_B" in name:
                weights.data.normal_(0, 0.5)
    model = TextModel(encoder, pooling, outputs)
    if isinstance(pooling, poolings.WeightedLayerPooling):
        pooling.layer_logits.data = torch.tensor([0.3, -0.2, 0.9])  # not the uniform start: the weights must travel
    return model.eval()


@pytest.mark.parametrize("pooling", list(POOLINGS))
@pytest.mark.parametrize("task", list(TASKS))
def test_onnx_graph_matches_pytorch_for_every_task_and_pooling(tmp_path, tokenizer_dir, task, pooling):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if pooling == "lasttoken":
        tokenizer.padding_side = "left"  # as for decoder embedders: the last token is the real one
    settings, outputs = TASKS[task]
    model = tiny_model(tokenizer, POOLINGS[pooling], outputs)
    folder = save_model(tmp_path / "model", model, tokenizer, ["a", "b", "c"] if outputs == 3 else [], None, "", 64,
                        task=settings)
    export_onnx(folder, folder / "onnx")
    columns = [texts(200, 1), texts(200, 2)] if settings["data_type"] == "pair" else [texts(200, 1)]
    torch_side, onnx_side = Predictor(folder, "torch"), Predictor(folder, "onnx")
    for batch_size in (1, 7, 32):
        want = torch_side.run(columns, batch_size, embeddings=True)
        got = onnx_side.run(columns, batch_size, embeddings=True)
        if want["head"] is not None:
            assert np.abs(want["head"] - got["head"]).max() <= 1e-4
        for a, b in zip(want["columns"], got["columns"]):
            assert np.abs(a - b).max() <= 1e-4
    if task == "cross-encoder":  # what a user reads: scores in the original range
        ours = [r["score"] for r in onnx_side.records(onnx_side.run(columns, 32))]
        assert ours == pytest.approx([r["score"] for r in torch_side.records(torch_side.run(columns, 32))], abs=1e-4)


def test_lora_is_merged_into_the_onnx_graph_and_a_plain_folder(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model(tokenizer, poolings.MeanPooling(), 3, lora=True)
    folder = save_model(tmp_path / "model", model, tokenizer, ["a", "b", "c"], None, "", 64, task=TASKS["classifier"][0])
    assert json.loads((folder / "runner_model.json").read_text())["encoder"] == "adapter"
    columns = [texts(50, 3)]
    want = Predictor(folder, "torch").run(columns, 8, embeddings=True)
    export_onnx(folder, folder / "onnx")
    got = Predictor(folder, "onnx").run(columns, 8, embeddings=True)
    assert np.abs(want["head"] - got["head"]).max() <= 1e-4
    merged = export_merged(folder, tmp_path / "merged")
    assert not (merged / "adapter").exists()
    # the merged encoder loads with transformers alone: peft is never imported
    script = ("import sys, torch\nfrom transformers import AutoModel, AutoTokenizer\n"
              f"m = AutoModel.from_pretrained({str(merged / 'encoder')!r}).eval()\n"
              f"t = AutoTokenizer.from_pretrained({str(merged / 'tokenizer')!r})\n"
              "b = t(sys.argv[1:], padding=True, return_tensors='pt')\n"
              "with torch.no_grad(): h = m(**b).last_hidden_state\n"
              "mask = b['attention_mask'].unsqueeze(-1).float()\n"
              "print(((h * mask).sum(1) / mask.sum(1)).tolist())\n"
              "assert 'peft' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", script, *columns[0][:5]], capture_output=True, text=True, check=True)
    plain = np.array(json.loads(out.stdout))
    # merging rounds W + BA once per layer in fp32, and the roundings travel through every later layer:
    # a few 1e-5 on values of about 1 (the ONNX graph is held to 1e-4)
    np.testing.assert_allclose(plain, want["columns"][0][:5], rtol=0, atol=5e-5)


def test_export_bad_input(tmp_path, capsys):
    from runner.export import main

    for args, message in ([[f"model_dir={tmp_path}"], "no runner_model.json"],
                          [[f"model_dir={tmp_path / 'x'}"], "no such folder"]):
        with pytest.raises(SystemExit):
            main(args)
        assert message in capsys.readouterr().err


def test_mode_merge_saves_a_plain_encoder_with_the_same_predictions(make_run, toy_data, tmp_path):
    from pathlib import Path

    from runner import job
    from runner.evaluate import EvaluateConfig, evaluate

    run = make_run("mode=peft", "mode.merge=true", "train.epochs=2", "train.lr=1e-2")
    job.execute(run)
    folder = Path(run.cfg.output_dir) / "model"
    meta = json.loads((folder / "runner_model.json").read_text())
    assert meta["encoder"] == "encoder" and not (folder / "adapter").exists()
    logged = json.loads((Path(run.cfg.output_dir) / "metrics.json").read_text())["metrics"]
    again = evaluate(EvaluateConfig(model_dir=str(folder), progress=False, data={"test": toy_data["test"]}))["metrics"]
    assert again["test/accuracy"] == logged["test/accuracy"]
    assert again["test/loss"] == pytest.approx(logged["test/loss"], abs=1e-5)


def test_backend_auto_takes_the_graph_only_when_it_was_exported_from_these_weights(tmp_path, tokenizer_dir, caplog):
    """predict's default backend: the exported fp32 graph when it belongs to the folder's weights, else PyTorch;
    an explicit onnx backend on a stale graph is an error. The export records what ONNX Runtime fuses, the
    offline transformer fusion it measured, and (with a labelled file) what int8 costs."""
    import logging

    import pandas as pd
    from transformers import AutoTokenizer

    from runner.errors import RunnerError
    from runner.export import int8_check

    caplog.set_level(logging.INFO, logger="runner")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = save_model(tmp_path / "model", tiny_model(tokenizer, poolings.MeanPooling(), 3), tokenizer, ["a", "b", "c"],
                        None, "", 64, task=TASKS["classifier"][0])
    assert Predictor(folder).backend == "torch"
    assert "no exported graph" in caplog.text
    export_onnx(folder, folder / "onnx", quantize="int8")
    record = json.loads((folder / "onnx" / "runner_model.json").read_text())["onnx"]
    assert record["fusions"] and record["int8_fusions"].get("DynamicQuantizeMatMul", 0) > 0
    assert set(record["offline_fusion"]) >= {"kept"}
    auto = Predictor(folder)
    assert auto.backend == "onnx" and auto.precision == "fp32"
    columns = [texts(40, 5)]
    want = Predictor(folder, "torch", "fp32").run(columns, 8)["head"]
    assert np.abs(auto.run(columns, 8)["head"] - want).max() <= 1e-4

    labelled = tmp_path / "labelled.csv"
    pd.DataFrame({"text": columns[0], "label": [random.Random(i).choice("abc") for i in range(40)]}).to_csv(labelled, index=False)
    cost = int8_check(folder, str(labelled), {})
    assert set(cost["fp32"]) == set(cost["int8"]) and "test/accuracy" in cost["int8"]
    caplog.clear()
    Predictor(folder, "onnx-int8")
    assert "int8 accuracy cost: test/accuracy" in caplog.text

    # the folder's weights change after the export (trained again into the same place): the graph is stale
    save_model(folder, tiny_model(tokenizer, poolings.MeanPooling(), 3, lora=True), tokenizer, ["a", "b", "c"], None,
               "", 64, task=TASKS["classifier"][0])
    caplog.clear()
    assert Predictor(folder).backend == "torch"
    assert "exported from other weights" in caplog.text
    with pytest.raises(RunnerError, match="exported from other weights.*export again"):
        Predictor(folder, "onnx")


def test_predict_replaces_an_earlier_output_file(tmp_path, tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    from runner.predict import main

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = save_model(tmp_path / "model", tiny_model(tokenizer, poolings.MeanPooling(), 3), tokenizer, ["a", "b", "c"],
                        None, "", 64, task=TASKS["classifier"][0])
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    main([f"model_dir={folder}", "text=a short text", f"output={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["label"] in "abc"
