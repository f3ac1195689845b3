"""Crafted dual-encoder (image and text) model folders, as an attacker would share them: a processor config naming
a class to build, a config.json naming remote code, pickled weights, a runner_model.json naming another model kind,
a linear probe's head with other tensors. Each is refused in one line by predict, evaluate and export (and the
pyfunc model), and no payload runs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from runner.evaluate import main as evaluate_main
from runner.export import main as export_main
from runner.predict import main as predict_main
from tests.conftest import run_cli
from tests.security.test_crafted_folders import MARKER, Payload, run_tool
from tests.test_images import base, write_digits


@pytest.fixture(scope="module")
def dual_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP trained on digit pairs and a linear probe on it, once for the module."""
    root = tmp_path_factory.mktemp("dual")
    pairs = write_digits(root, 160)

    class Uncaptured:  # a module fixture has no capsys: the runs print as they go
        def readouterr(self):
            return SimpleNamespace(out="", err="")

    for name, extra in (("clip", []), ("probe", ["data.type=image", "data.label_field=label", "mode=head_only"])):
        code, _ = run_cli(base(root / name, "tiny_clip", pairs, "train.epochs=1", "tracking.enabled=false",
                               f"cache.dir={root / 'cache'}", *extra), Uncaptured())
        assert code == 0
    return {"clip": root / "clip" / "run" / "model", "probe": root / "probe" / "run" / "model", "pairs": pairs}


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def processor_class(folder: Path) -> None:  # a class named by the file, with an argument that would run a command
    edit_json(folder / "preprocessor_config.json", image_processor_type="os.system", command=f"touch {MARKER}")


def huge_processor(folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text('{"image_processor_type": "CLIPImageProcessor", "x": "'
                                                     + "a" * (2 << 20) + '"}')


def remote_code(folder: Path) -> None:  # config.json asks transformers to import the folder's own module
    (folder / "evil.py").write_text(f"import os\nos.system('touch {MARKER}')\n")
    edit_json(folder / "config.json", auto_map={"AutoModel": "evil.Model", "AutoConfig": "evil.Config"})
    edit_json(folder / "runner_model.json", model_type="evil")


def pickled_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))


def another_model_kind(folder: Path) -> None:
    edit_json(folder / "runner_model.json", model_type="bert")


def config_disagrees(folder: Path) -> None:  # runner_model.json says clip, config.json another dual kind
    edit_json(folder / "runner_model.json", model_type="siglip")


def probe_head(folder: Path) -> None:
    save_file({"head.1.weight": torch.zeros(3, 32), "head.1.bias": torch.zeros(3), "extra": torch.zeros(1)},
              str(folder / "head.safetensors"))


CASES = [
    ("processor class named by the file", "clip", processor_class, "image processor 'os.system' is not one the runner offers"),
    ("huge processor config", "clip", huge_processor, "bytes, more than a runner file of this kind holds"),
    ("remote code in config.json", "clip", remote_code, "model_type='evil' is not a valid value"),
    ("pickled weights", "clip", pickled_weights, "pickle files (pytorch_model.bin)"),
    ("another model kind", "clip", another_model_kind, "model_type='bert' is not a valid value"),
    ("config.json disagrees", "clip", config_disagrees, "config.json says clip, runner_model.json siglip"),
    ("probe head with other tensors", "probe", probe_head, "head.safetensors: tensors"),
]


@pytest.mark.parametrize("name,kind,craft,message", CASES, ids=[c[0] for c in CASES])
def test_a_crafted_dual_folder_is_refused_in_one_line(name, kind, craft, message, dual_models, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    MARKER.unlink(missing_ok=True)
    folder = tmp_path / "shared" / "model"
    shutil.copytree(dual_models[kind], folder)
    craft(folder)
    pairs = str(dual_models["pairs"])
    for main, args in ((predict_main, [f"input={pairs}"]),
                       (evaluate_main, [f"data.test={pairs}", "tracking=false", "progress=false"]),
                       (export_main, ["format=onnx", f"output={tmp_path / 'out'}"])):
        code, err = run_tool(main, [f"model_dir={folder}", *args], capsys)
        assert code == 1, (main.__module__, err)
        assert "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (main.__module__, err)
        assert not MARKER.exists(), f"{main.__module__} ran the payload"
    assert not (tmp_path / "out").exists()


def test_the_pyfunc_model_refuses_a_crafted_dual_folder(dual_models, tmp_path):
    import mlflow.pyfunc

    from runner.errors import RunnerError

    MARKER.unlink(missing_ok=True)
    folder = tmp_path / "model"
    shutil.copytree(dual_models["clip"], folder)
    processor_class(folder)
    entry = Path(__import__("runner.pyfunc_entry").__file__).parent / "pyfunc_entry.py"
    mlflow.pyfunc.save_model(tmp_path / "pyfunc", python_model=str(entry), artifacts={"runner_model": str(folder)})
    with pytest.raises(RunnerError, match="is not one the runner offers"):
        mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    assert not MARKER.exists()
