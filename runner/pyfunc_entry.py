"""The MLflow model's code (MLflow's models-from-code): logged as this file, not as a pickled object, so
loading a runner model from a shared MLflow store or registry unpickles nothing. The model itself is the
runner folder logged beside it as the artifact ``runner_model`` (data, checked by runner.trust)."""

from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd


class RunnerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from runner.artifact import read_meta
        from runner.predict import Predictor

        folder = Path(context.artifacts["runner_model"])
        if read_meta(folder).get("kind") == "dual":  # images (base64 of the file) and/or texts
            from runner.dual_inference import DualPredictor

            self.predictor = DualPredictor.load(folder)
        else:
            self.predictor = Predictor(folder)

    # A DataFrame type hint: MLflow then relies on the explicit signature below instead of type-hint validation
    # (and does not advise adding hints after every run)
    def predict(self, context, model_input: pd.DataFrame, params=None):
        import numpy as np

        meta, params = self.predictor.meta, params or {}
        if meta.get("kind") == "dual":
            return self.dual(model_input, params)
        if meta.get("input") == "embeddings":
            inputs = np.asarray(model_input["embedding"].tolist(), dtype=np.float32)
        else:
            inputs = [model_input["text"].astype(str).tolist()]
            if meta.get("data_type") == "pair":
                inputs.append(model_input["text_pair"].astype(str).tolist())
        outputs = self.predictor.run(inputs, embeddings=bool(params.get("embeddings", False)))
        return self.predictor.records(outputs, params.get("top_k"))


    def dual(self, model_input: pd.DataFrame, params: dict):
        """Rows of ``image`` (base64 of an image file) and/or ``text``; a bad image is the client's error (400)."""
        import base64
        import binascii

        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from runner.errors import RunnerError

        if not {"image", "text"} & set(model_input.columns):
            raise MlflowException("send an image column (base64 of an image file) and/or a text column",
                                  error_code=INVALID_PARAMETER_VALUE)
        try:
            images = ([base64.b64decode(v, validate=True) for v in model_input["image"].astype(str)]
                      if "image" in model_input.columns else None)
            texts = model_input["text"].astype(str).tolist() if "text" in model_input.columns else None
            return self.predictor.run(images, texts, embeddings=bool(params.get("embeddings", False)))
        except (binascii.Error, RunnerError) as err:
            raise MlflowException(f"bad input: {err}", error_code=INVALID_PARAMETER_VALUE) from err


mlflow.models.set_model(RunnerModel())
