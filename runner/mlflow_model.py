"""A saved model as an MLflow pyfunc model: ``mlflow models predict`` / ``serve`` / the Model Registry.

Every job that saves a model also logs it to its MLflow run under ``model/`` (with a signature and an input
example), so that

    mlflow models serve -m runs:/<run id>/model --env-manager local
    curl -X POST localhost:5000/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"text": "a gripping film"}]}'

answers with what ``runner.predict`` writes for those rows. ``tracking.register=<name>`` also registers
it in the Model Registry. Input columns: ``text`` (and ``text_pair`` for pair models), or ``embedding``
for a head on given embeddings; ``embeddings: true`` in the request's params adds the vectors.

The logged model holds no pickle: MLflow's models-from-code logs ``runner/pyfunc_entry.py`` (the model class,
which answers through runner.predict) and the runner folder as an artifact, which loads as data (runner.trust).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

log = logging.getLogger("runner")


def requirements() -> list[str]:
    """What the model needs besides the runner itself (installed from its source: it is not on PyPI)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "transformers", "peft", "safetensors", "mlflow", "pandas")]


def example_image() -> str:
    """A 32x32 PNG as base64: how a request sends an image."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def log_pyfunc(client, run_id: str, folder: Path, register: str | None = None) -> None:
    """Save the pyfunc flavour of ``folder`` and log it as the run's ``model/`` artifact (optionally registered)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar in the run's log
    meta = json.loads((folder / "runner_model.json").read_text())
    if meta.get("input") == "embeddings":  # a list column; no example (its length is the model's dim)
        columns, example = [ColSpec(mlflow.types.schema.Array("double"), "embedding")], None
    elif meta.get("kind") == "dual":  # an image (base64 of its file) and/or a text per row
        columns = [ColSpec("string", "image", required=False), ColSpec("string", "text", required=False)]
        example = pd.DataFrame({"image": [example_image()], "text": ["a photo of a cat"]})
    else:
        columns = [ColSpec("string", "text")] + ([ColSpec("string", "text_pair")] if meta.get("data_type") == "pair" else [])
        example = pd.DataFrame({c.name: ["a gripping, beautiful film", "the plot goes nowhere"] for c in columns})
    params = ParamSchema([ParamSpec("embeddings", "boolean", False), ParamSpec("top_k", "long", None)])
    signature = ModelSignature(inputs=Schema(columns), params=params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        # requirements given, not inferred: inference loads the model in a subprocess (about 8 s a job)
        # models-from-code: the model is runner/pyfunc_entry.py plus the folder, no pickled Python object
        mlflow.pyfunc.save_model(path, python_model=str(Path(__file__).with_name("pyfunc_entry.py")), artifacts={"runner_model": str(folder)},
                                 signature=signature, input_example=example, pip_requirements=requirements())
        client.log_artifacts(run_id, str(path), "model")
    if register:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(register)
        except MlflowException:  # it exists: this run becomes its next version
            pass
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        version = client.create_model_version(register, source, run_id)
        log.info("registered model %s version %s", register, version.version)
