"""runner.serve: answers as runner.predict does, batches concurrent requests without mixing their rows, turns
every malformed request into a 4xx with a message (and keeps answering), and runs as a real HTTP server that
exports its graph at start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from runner import pooling as poolings
from runner.artifact import save_model
from runner.predict import Predictor
from runner.serve import ServeConfig, make_app
from tests.test_export import TASKS, texts, tiny_model
from tests.test_mlflow_model import free_port, wait_for


def saved(tmp_path, tokenizer_dir, task: str = "classifier") -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings, outputs = TASKS[task]
    return save_model(tmp_path / "model", tiny_model(tokenizer, poolings.MeanPooling(), outputs), tokenizer,
                      ["a", "b", "c"] if outputs == 3 else [], None, "", 64, task=settings)


@pytest.fixture
def client(tmp_path, tokenizer_dir):
    from starlette.testclient import TestClient

    folder = saved(tmp_path, tokenizer_dir)
    predictor = Predictor(folder, "torch", "fp32")
    with TestClient(make_app(ServeConfig(model_dir=str(folder), max_texts=50, max_body_kb=16), predictor)) as c:
        yield c, predictor


def test_answers_are_runner_predicts_rows_in_every_request_format(client):
    c, predictor = client
    sample = texts(5, 7)
    want = predictor.records(predictor.run([sample], 8))
    bodies = [{"dataframe_records": [{"text": t} for t in sample]},
              {"dataframe_split": {"columns": ["text"], "data": [[t] for t in sample]}},
              {"inputs": sample}, {"inputs": {"text": sample}}]
    for body in bodies:
        response = c.post("/invocations", json=body)
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        assert [r["label"] for r in got] == [r["label"] for r in want]
        for a, b in zip(got, want):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    top = c.post("/invocations", json={"inputs": sample[:1], "params": {"top_k": 1, "embeddings": True}}).json()
    assert len(top["predictions"][0]["probabilities"]) == 1 and len(top["predictions"][0]["embedding"]) == 32
    assert c.get("/ping").json() == {"status": "ok"}
    about = c.get("/metadata").json()
    assert about["backend"] == "torch" and about["labels"] == ["a", "b", "c"] and about["inputs"] == ["text"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(client):
    c, predictor = client
    groups = [texts(1 + i % 4, 100 + i) for i in range(24)]
    want = [predictor.records(predictor.run([g], 8)) for g in groups]
    answers: dict[int, list] = {}

    def send(i: int) -> None:
        answers[i] = c.post("/invocations", json={"inputs": groups[i]}).json()["predictions"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, rows in answers.items():
        assert [r["label"] for r in rows] == [r["label"] for r in want[i]]
        for a, b in zip(rows, want[i]):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


@pytest.mark.parametrize(("body", "kind", "status", "message"), [
    (b'{"dataframe_records": [{"txt": "a film"}]}', "application/json", 400, "row 0 has no 'text'"),
    (b'{"dataframe_records": [{"text": 3}]}', "application/json", 400, "'text' must be a string (got int)"),
    (b'{"dataframe_records": [{"text": "a", "extra": 1}]}', "application/json", 400, "unknown columns ['extra']"),
    (b'{"dataframe_records": [{"text": ', "application/json", 400, "not valid JSON"),
    (b'{"inputs": ["\xff\xfe"]}', "application/json", 400, "not UTF-8"),
    (b'{"inputs": ["' + b"a" * 20000 + b'"]}', "application/json", 413, "over 16 KB"),
    (b'{"dataframe_records": []}', "application/json", 400, "no rows"),
    (json.dumps({"inputs": ["a"] * 51}).encode(), "application/json", 413, "at most 50"),
    (b'["a film"]', "application/json", 400, "JSON object"),
    (b'{"inputs": ["a"], "params": {"top_k": 0}}', "application/json", 400, "top_k must be a positive integer"),
    (b'{"inputs": ["a"], "params": {"temperature": 2}}', "application/json", 400, "params takes embeddings"),
    (b'{"inputs": ["a"], "dataframe_records": []}', "application/json", 400, "exactly one of"),
    (b'text\na film\n', "text/csv", 415, "send application/json"),
])
def test_malformed_requests_are_4xx_with_a_message_and_the_server_keeps_answering(client, body, kind, status, message):
    c, _ = client
    response = c.post("/invocations", content=body, headers={"Content-Type": kind})
    assert response.status_code == status
    assert message in response.json()["message"]
    assert c.post("/invocations", json={"inputs": ["still here"]}).status_code == 200


def test_the_server_exports_its_graph_at_start_answers_over_http_and_stops_on_sigterm(tmp_path, tokenizer_dir):
    folder = saved(tmp_path, tokenizer_dir)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "runner.serve", f"model_dir={folder}", f"port={port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", 120)
        assert (folder / "onnx" / "model.onnx").exists()  # backend=auto exported the graph from these weights
        about = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata").read())
        assert about["backend"] == "onnx" and about["precision"] == "fp32"
        sample = texts(6, 3)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"inputs": sample}).encode(),
                                         headers={"Content-Type": "application/json"})
        got = json.loads(urllib.request.urlopen(request).read())["predictions"]
        want = Predictor(folder, "torch", "fp32")
        expected = want.records(want.run([sample], 8))
        assert np.allclose([list(r["probabilities"].values()) for r in got],
                           [list(r["probabilities"].values()) for r in expected], atol=1e-4)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert server.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises the signal


def test_serve_refuses_what_it_cannot_serve(tmp_path, tokenizer_dir, capsys):
    from runner.serve import main

    folder = saved(tmp_path, tokenizer_dir)
    for args, message in (([f"model_dir={tmp_path / 'nothing'}"], "no such folder"),
                          ([f"model_dir={folder}", "max_batch=0"], "max_batch=0 must be at least 1"),
                          ([f"model_dir={folder}", "backend=onnx"], "does not exist: run python -m runner.export"),
                          ([f"model_dir={folder}", "workers=3"], "workers")):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code != 0
        assert message in capsys.readouterr().err
