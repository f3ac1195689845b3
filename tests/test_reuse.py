"""Jobs of one process (a search's trials) load a model's tokenizer, checks and frozen encoder once, give the
results they give alone, and load again when the folder changes."""

from __future__ import annotations

import os

import pytest
import torch

from runner import experiment, job, reuse


@pytest.fixture
def model_folder(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path / "bert"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_trials_in_one_process_share_the_frozen_encoder_and_get_the_same_results(make_run, model_folder, tmp_path,
                                                                                  monkeypatch):
    reuse.KEPT.clear()
    loads = []
    original = experiment.load_encoder
    monkeypatch.setattr(experiment, "load_encoder", lambda *a, **k: loads.append(1) or original(*a, **k))
    args = ["mode=head_only", f"model.name_or_path={model_folder}", "model.tokenizer=null", "model.random_init=null",
            "train.epochs=2", "train.head_dropout=0.2"]
    values = [job.execute(make_run(*args, f"output_dir={tmp_path / f'job{i}'}", "train.resume=never"))
              for i in range(3)]
    assert len(loads) == 1  # three jobs, one load
    assert values[0] == values[1] == values[2]  # a kept encoder shifts no random draw of the next job

    reuse.KEPT.clear()
    alone = job.execute(make_run(*args, f"output_dir={tmp_path / 'alone'}"))
    assert alone == values[0]  # the same as a job in a fresh process

    weights = model_folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    job.execute(make_run(*args, f"output_dir={tmp_path / 'changed'}"))
    assert len(loads) == 3  # the folder changed: loaded again


def test_a_failed_build_keeps_nothing():
    reuse.KEPT.clear()
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("no")

    for _ in range(2):
        with pytest.raises(ValueError):
            reuse.shared("thing", {"a": 1}, broken)
    assert len(calls) == 2 and not reuse.KEPT
    for i in range(reuse.LIMIT + 2):
        reuse.shared("thing", {"a": i}, lambda i=i: i)
    assert len(reuse.KEPT) == reuse.LIMIT
