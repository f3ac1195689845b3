"""The MLflow model's code (MLflow's models-from-code): logged as this file, not as a pickled object, so
loading a runner model from a shared MLflow store or registry unpickles nothing. The model itself is the
runner folder logged beside it as the artifact ``runner_model`` (data, checked by runner.trust)."""

from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd


class RunnerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from runner.predict import Predictor

        self.predictor = Predictor(Path(context.artifacts["runner_model"]))

    # A DataFrame type hint: MLflow then relies on the explicit signature below instead of type-hint validation
    # (and does not advise adding hints after every run)
    def predict(self, context, model_input: pd.DataFrame, params=None):
        import numpy as np

        meta, params = self.predictor.meta, params or {}
        if meta.get("input") == "embeddings":
            inputs = np.asarray(model_input["embedding"].tolist(), dtype=np.float32)
        else:
            inputs = [model_input["text"].astype(str).tolist()]
            if meta.get("data_type") == "pair":
                inputs.append(model_input["text_pair"].astype(str).tolist())
        outputs = self.predictor.run(inputs, embeddings=bool(params.get("embeddings", False)))
        return self.predictor.records(outputs, params.get("top_k"))


mlflow.models.set_model(RunnerModel())
