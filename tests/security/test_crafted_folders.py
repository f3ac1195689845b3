"""Crafted model folders and checkpoints, as an attacker would share them: none runs code, none makes the
runner read outside the folder, and each is refused with one line (exit 1, no traceback) by predict,
evaluate, export, the MLflow pyfunc model and train.resume.

Every payload that would run code writes a marker file; every path that leads outside the folder leads to
a *valid* model there, so reading it would succeed: a test that passes proves the runner refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runner import job
from runner.evaluate import main as evaluate_main
from runner.export import main as export_main
from runner.predict import main as predict_main

MARKER = Path("/tmp/runner-security-marker")  # written by any payload that runs


class Payload:
    """A pickle that runs a command when unpickled."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def run_tool(main, args: list[str], capsys) -> tuple[int, str]:
    """(exit code, standard error) of a tool's main."""
    from tests.test_predict import run_tool as run

    code, _, err = run(main, args, capsys)
    return code, err


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A full and a LoRA tiny classifier, trained once for the module."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from runner.run import build_run
    from tests.conftest import compose_config, make_sentences, write_csv

    root = tmp_path_factory.mktemp("trained")
    train = write_csv(root / "train.csv", make_sentences(48, 0))
    test = write_csv(root / "test.csv", make_sentences(16, 2))
    models = {"test": test}
    for mode in ("full", "peft"):
        cfg = compose_config(["model=tiny", f"model.tokenizer={tokenizer_dir}", "data=csv", f"data.train={train}",
                              "data.validation=null", "hardware=cpu", "precision=fp32", "train.epochs=1",
                              "train.progress=false", f"mode={mode}", f"output_dir={root / mode}",
                              "tracking.enabled=false", f"cache.dir={root / 'cache'}"], with_hydra=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        job.execute(build_run(cfg, choices))
        models[mode] = root / mode / "model"
    GlobalHydra.instance().clear()
    return models


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "runner_model.json").read_text())
    meta.update(changes)
    (folder / "runner_model.json").write_text(json.dumps(meta))


def pooling_walk(target):
    def craft(folder: Path, outside: Path) -> None:
        edit_meta(folder, pooling={"_target_": target, "args": [f"touch {MARKER}"], "shell": True})
    return craft


def pickled_weights(folder: Path, outside: Path) -> None:
    """Encoder weights replaced by a pickle (as an old .bin checkpoint would be), with a payload."""
    for f in (folder / "encoder").glob("*.safetensors"):
        f.unlink()
    (folder / "encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))


def pickled_adapter(folder: Path, outside: Path) -> None:
    for f in (folder / "adapter").glob("*.safetensors"):
        f.unlink()
    (folder / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))


def megatron_import(folder: Path, outside: Path) -> None:
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    config.update(megatron_config={"tensor_model_parallel_size": 1}, megatron_core="antigravity")
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config))


def link_out(name: str):
    def craft(folder: Path, outside: Path) -> None:
        target = outside / name
        shutil.rmtree(folder / name) if (folder / name).is_dir() else (folder / name).unlink()
        (folder / name).symlink_to(target)
    return craft


def traversal(**changes):
    def craft(folder: Path, outside: Path) -> None:
        edit_meta(folder, **{k: v.format(outside=outside) for k, v in changes.items()})
    return craft


def huge_json(folder: Path, outside: Path) -> None:
    meta = json.loads((folder / "runner_model.json").read_text())
    meta["padding"] = "x" * (2 << 20)
    (folder / "runner_model.json").write_text(json.dumps(meta))


def deep_json(folder: Path, outside: Path) -> None:
    (folder / "runner_model.json").write_text("[" * 200_000 + "]" * 200_000)


def head_tensors(change):
    def craft(folder: Path, outside: Path) -> None:
        weights = load_file(folder / "head.safetensors")
        save_file(change(weights), folder / "head.safetensors")
    return craft


def truncated(name: str):
    def craft(folder: Path, outside: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return craft


def lying_header(folder: Path, outside: Path) -> None:
    """A safetensors header that places a tensor far past the end of the file."""
    header = json.dumps({"head.1.weight": {"dtype": "F32", "shape": [2, 32], "data_offsets": [0, 1 << 40]}}).encode()
    (folder / "head.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


def yaml_bomb(folder: Path, outside: Path) -> None:
    """Nine levels of nine aliases: 9**9 strings once copied (a 'billion laughs')."""
    levels = [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (folder / "config.yaml").write_text("\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]", *levels,
                                                   "data: {text_field: text}"]))


def env_interpolation(folder: Path, outside: Path) -> None:
    (folder / "config.yaml").write_text("data:\n  text_field: ${oc.env:HOME}\n")


CASES = [  # (name, which trained model, craft, what the one line says)
    ("pooling walks to os.system", "full", pooling_walk("runner.pooling.torch.os.system"), "unknown pooling"),
    ("pooling walks to subprocess.Popen", "full", pooling_walk("runner.pooling.torch.utils.cpp_extension.subprocess.Popen"),
     "unknown pooling"),
    ("pooling outside the runner", "full", pooling_walk("subprocess.Popen"), "unknown pooling"),
    ("pooling with unknown arguments", "full",
     traversal(), None),  # replaced below: a known class with an extra keyword
    ("head of another type", "full", lambda f, o: edit_meta(f, head={"type": "subprocess.Popen", "in_features": 32,
                                                                    "out_features": 2}), "head="),
    ("task not the runner's", "full", lambda f, o: edit_meta(f, task="os.system"), "task='os.system'"),
    ("pickled encoder weights", "full", pickled_weights, "pickle files (pytorch_model.bin)"),
    ("pickled adapter weights", "peft", pickled_adapter, "pickle files (adapter_model.bin)"),
    ("adapter config importing a module", "peft", megatron_import, "megatron_config="),
    ("encoder path traversal", "full", traversal(encoder="../outside/encoder"), "encoder='../outside/encoder' is not one of"),
    ("tokenizer path traversal", "full", traversal(tokenizer="{outside}/tokenizer"), "is not one of the folders"),
    ("base model as a path", "peft", traversal(base_model="../../outside"), "is not a Hugging Face Hub id"),
    ("base model as an absolute path", "full", traversal(encoder="base", base_model="{outside}",
                                                         base_weights_sha256="0" * 64), "is not a Hugging Face Hub id"),
    ("encoder linked out", "full", link_out("encoder"), "is a symbolic link to"),
    ("tokenizer linked out", "full", link_out("tokenizer"), "is a symbolic link to"),
    ("head weights linked out", "full", link_out("head.safetensors"), "is a symbolic link to"),
    ("huge runner_model.json", "full", huge_json, "more than a runner file of this kind holds"),
    ("deeply nested runner_model.json", "full", deep_json, "nests too deeply"),
    ("head weights of the wrong shape", "full", head_tensors(lambda w: {**w, "head.1.weight": torch.zeros(3, 32)}),
     "head.1.weight is torch.float32 [3, 32], the model needs a floating [2, 32]"),
    ("head weights of an integer dtype", "full",
     head_tensors(lambda w: {k: v.to(torch.int64) for k, v in w.items()}), "the model needs a floating"),
    ("extra head tensors", "full", head_tensors(lambda w: {**w, "head.9.weight": torch.zeros(1)}),
     "are not part of this model"),
    ("NaN head weights", "full", head_tensors(lambda w: {k: v * float("nan") for k, v in w.items()}),
     "holds NaN or infinite values"),
    ("truncated head weights", "full", truncated("head.safetensors"), "is truncated or not a safetensors file"),
    ("safetensors header past the end", "full", lying_header, "is truncated or not a safetensors file"),
    ("truncated encoder weights", "full", truncated("encoder/model.safetensors"), "cannot load this model"),
    ("labels that are objects", "full", lambda f, o: edit_meta(f, labels=[{"__class__": "x"}, 1]), "labels="),
    ("more labels than outputs", "full", lambda f, o: edit_meta(f, labels=["a", "b", "c"]), "3 labels for a head of 2"),
    ("format version as an object", "full", lambda f, o: edit_meta(f, format_version={"x": 1}), "format version"),
]
CASES[3] = ("pooling with unknown arguments", "full", lambda f, o: edit_meta(f, pooling={
    "_target_": "runner.pooling.MeanPooling", "layers": [-1], "normalize": False, "cmd": "touch"}), "pooling arguments")

TOOLS = {  # how each command meets a folder
    "predict": (predict_main, ["text=a good film"]),
    "evaluate": (evaluate_main, ["tracking=false", "progress=false"]),
    "export": (export_main, ["format=onnx"]),
}


@pytest.fixture
def crafted(trained_models, tmp_path):
    def make(kind: str, craft) -> Path:
        folder = tmp_path / "shared" / "model"
        shutil.copytree(trained_models[kind], folder)
        outside = tmp_path / "shared" / "outside"
        shutil.copytree(trained_models[kind], outside)  # a valid model outside: reading it would succeed
        craft(folder, outside)
        return folder
    return make


@pytest.mark.parametrize("name,kind,craft,message", CASES, ids=[c[0] for c in CASES])
def test_a_crafted_folder_is_refused_in_one_line(name, kind, craft, message, crafted, trained_models, tmp_path, capsys,
                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    MARKER.unlink(missing_ok=True)
    folder = crafted(kind, craft)
    for tool, (main, args) in TOOLS.items():
        extra = [f"data.test={trained_models['test']}"] if tool == "evaluate" else []
        code, err = run_tool(main, [f"model_dir={folder}", *args, *extra, f"output={tmp_path / 'out'}"]
                             if tool == "export" else [f"model_dir={folder}", *args, *extra], capsys)
        assert code == 1, (tool, err)
        assert "Traceback" not in err, (tool, err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (tool, err)
        assert not MARKER.exists(), f"{tool} ran the payload"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["yaml alias bomb", "environment interpolation"])
def test_a_crafted_config_yaml_is_refused(name, crafted, trained_models, tmp_path, capsys):
    folder = crafted("full", yaml_bomb if name == "yaml alias bomb" else env_interpolation)
    for main, args in ((predict_main, [f"input={trained_models['test']}"]),
                       (evaluate_main, [f"data.test={trained_models['test']}", "tracking=false"])):
        code, err = run_tool(main, [f"model_dir={folder}", *args], capsys)
        assert code == 1 and "Traceback" not in err, err
        assert ("YAML aliases" if name == "yaml alias bomb" else "holds an interpolation") in err


def test_the_pyfunc_model_refuses_a_crafted_folder(crafted, tmp_path):
    """The MLflow model loads the runner folder as data too: a crafted artifact fails to load, runs nothing."""
    import mlflow.pyfunc

    from runner.errors import RunnerError

    MARKER.unlink(missing_ok=True)
    for craft in (pooling_walk("runner.pooling.torch.os.system"),):  # pickles: the same loader, tested above
        folder = crafted("full", craft)
        entry = Path(__import__("runner.pyfunc_entry").__file__).parent / "pyfunc_entry.py"
        saved = tmp_path / "pyfunc"
        mlflow.pyfunc.save_model(saved, python_model=str(entry), artifacts={"runner_model": str(folder)})
        with pytest.raises(RunnerError):
            mlflow.pyfunc.load_model(str(saved))
        assert not MARKER.exists()
        shutil.rmtree(tmp_path / "shared")
        shutil.rmtree(saved)


def test_the_logged_mlflow_model_holds_no_pickle(trained_models, tmp_path):
    """runner's MLflow model is models-from-code: its files are JSON, YAML, Python source and the runner folder."""
    import mlflow
    from mlflow import MlflowClient

    from runner.mlflow_model import log_pyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("pickles", artifact_location=str(tmp_path / "artifacts")))
    log_pyfunc(client, run.info.run_id, trained_models["full"])
    listed, stack = [], ["model"]
    while stack:
        for item in client.list_artifacts(run.info.run_id, stack.pop()):
            (stack if item.is_dir else listed).append(item.path)
    assert "model/MLmodel" in listed and any(p.endswith("pyfunc_entry.py") for p in listed)
    pickles = [p for p in listed if p.endswith((".pkl", ".pickle", ".bin", ".pt", ".pth", ".joblib", ".cloudpickle"))]
    assert pickles == []
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    import pandas as pd

    out = model.predict(pd.DataFrame({"text": ["good film", "bad film"]}))
    assert [sorted(r) for r in out] == [["label", "probabilities"]] * 2


# ---------------------------------------------------------------------------------------- train.resume


def crafted_checkpoint(run_dir: Path, change) -> Path:
    """The newest checkpoint of a finished run, changed by ``change`` and re-hashed (an attacker writes
    matching hashes, so the hash check cannot be what stops it)."""
    from runner.checkpoint import MARKER as COMPLETE
    from runner.checkpoint import sha256

    [latest] = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    change(latest)
    files = {p.name: sha256(p) for p in latest.iterdir() if p.name != COMPLETE and p.is_file()}
    (latest / COMPLETE).write_text(json.dumps({"files": files}))
    return latest


def test_train_resume_from_a_crafted_checkpoint_is_one_line(make_run, tiny_overrides, tmp_path, capsys):
    from tests.conftest import run_cli

    run = make_run("train.epochs=1", "train.keep_checkpoints_after_run=true")
    job.execute(run)
    run_dir = Path(run.cfg.output_dir)
    base = [a for a in tiny_overrides if not a.startswith("output_dir=")]
    cases = [
        (lambda c: save_file({"x": torch.zeros(1)}, c / "model.safetensors"), "holds other trainable weights"),
        (lambda c: save_file({k: torch.zeros(1) for k in load_file(c / "model.safetensors")}, c / "model.safetensors"),
         "the model needs a floating"),
        (lambda c: (c / "state.json").write_text(json.dumps({**json.loads((c / "state.json").read_text()),
                                                             "train_state": {"__class__": "x"}})), "loop state"),
        (lambda c: (c / "optimizer.safetensors").write_bytes(pickle.dumps(Payload())), "is truncated or not a safetensors"),
    ]
    MARKER.unlink(missing_ok=True)
    for change, message in cases:
        copy = tmp_path / f"copy{len(message)}"
        shutil.copytree(run_dir, copy)
        checkpoint = crafted_checkpoint(copy, change)
        code, out = run_cli([*base, f"train.resume={checkpoint}", f"output_dir={tmp_path / 'new'}",
                             "train.epochs=1"], capsys)
        assert code == 1 and message in out and "Traceback" not in out, out
        assert not MARKER.exists()
    code, out = run_cli([*base, f"train.resume={checkpoint}", f"output_dir={tmp_path / 'new'}", "train.epochs=2"], capsys)
    assert code == 1 and "was written by a different config (train.epochs: 1 -> 2)" in out, out
    assert "MLflow run" not in out  # found before tracking starts: no FAILED run left behind
    code, out = run_cli([*base, f"train.resume={checkpoint}", f"output_dir={tmp_path / 'new'}", "train.epochs=2"], capsys)
    assert code == 1 and "was written by a different config (train.epochs: 1 -> 2)" in out, out
    assert "MLflow run" not in out  # found before tracking starts: no FAILED run left behind
