"""Crafted onnx/ folders inside a shared model folder: predict, the server and the MLflow model now take the graph
by default (backend=auto), so what onnx/ holds is read from a folder a user was handed. None runs code, none
reads outside the folder; each is refused in one line, or (backend=auto) falls back to PyTorch when the graph
was not exported from the folder's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner.export import export_onnx
from runner.predict import main as predict_main
from runner.serve import main as serve_main
from tests.security.test_crafted_folders import MARKER, run_tool, trained_models  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def exported(trained_models, tmp_path_factory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(trained_models["full"], folder)
    export_onnx(folder, folder / "onnx", quantize="int8")
    return folder


def edit_onnx_meta(folder: Path, **changes) -> None:
    path = folder / "onnx" / "runner_model.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if key in ("int8_check", "source"):
            meta["onnx"][key] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def external_data(folder: Path) -> None:
    """The graph's weights point to a file outside the folder (ONNX external data)."""
    import onnx

    path = folder / "onnx" / "model.onnx"
    graph = onnx.load(str(path))
    tensor = graph.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../outside/weights.bin"
    onnx.save(graph, str(path))


CASES = [  # (name, craft, backend, what the one line says)
    ("int8 cost that is not numbers", lambda f: edit_onnx_meta(f, int8_check={"file": "x", "fp32": {"a": "os.system"},
                                                                               "int8": {"a": 1}}),
     "onnx-int8", "its int8_check is not what runner.export writes"),
    ("int8 cost that is an object", lambda f: edit_onnx_meta(f, int8_check=["__import__('os')"]), "onnx-int8",
     "its int8_check is not what runner.export writes"),
    ("graph weights outside the folder", external_data, "auto", "keeps weights in other files"),
    ("a digest that is not a string", lambda f: edit_onnx_meta(f, source={"sha": 1}), "onnx",
     "records no digest"),
    ("graph from other weights", lambda f: edit_onnx_meta(f, source="0" * 64), "onnx", "exported from other weights"),
]


@pytest.mark.parametrize("name,craft,backend,message", CASES, ids=[c[0] for c in CASES])
def test_a_crafted_onnx_folder_is_refused_in_one_line(name, craft, backend, message, exported, tmp_path, capsys):
    MARKER.unlink(missing_ok=True)
    folder = tmp_path / "shared" / "model"
    shutil.copytree(exported, folder)
    craft(folder)
    for main, args in ((predict_main, ["text=a good film", f"backend={backend}"]),
                       (serve_main, [f"backend={backend}", "port=0", "export=false"])):
        code, err = run_tool(main, [f"model_dir={folder}", *args], capsys)
        assert code == 1 and "Traceback" not in err, (main.__module__, err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (main.__module__, err)
    assert not MARKER.exists()


def test_backend_auto_runs_pytorch_on_a_graph_from_other_weights(exported, tmp_path, capsys, caplog):
    """auto never runs a graph that does not belong to the folder's weights: it predicts with PyTorch."""
    folder = tmp_path / "shared" / "model"
    shutil.copytree(exported, folder)
    edit_onnx_meta(folder, source="0" * 64)
    caplog.set_level("INFO", logger="runner")
    code, err = run_tool(predict_main, [f"model_dir={folder}", "text=a good film"], capsys)
    assert code == 0, err
    assert "backend=torch (auto)" in caplog.text and "exported from other weights" in caplog.text


def test_the_graph_runs_with_the_folders_own_metadata(exported, tmp_path, capsys, caplog):
    """onnx/runner_model.json's copy of the metadata is not what the graph's outputs are read with: labels, task
    and tokenization come from the folder's runner_model.json, which the export digest binds the graph to."""
    folder = tmp_path / "shared" / "model"
    shutil.copytree(exported, folder)
    edit_onnx_meta(folder, labels=["os.system", "eval"], pooling={"_target_": "os.system"}, max_length=2)
    caplog.set_level("INFO", logger="runner")
    code, err = run_tool(predict_main, [f"model_dir={folder}", "text=a good film", f"output={tmp_path / 'p.jsonl'}"],
                         capsys)
    assert code == 0 and "backend=onnx (auto)" in caplog.text, err
    labels = json.loads((folder / "runner_model.json").read_text())["labels"]
    assert json.loads((tmp_path / "p.jsonl").read_text())["label"] in labels
