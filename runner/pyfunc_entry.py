"""The MLflow model's code (MLflow's models-from-code): logged as this file, not as a pickled object, so
loading a runner model from a shared MLflow store or registry unpickles nothing. The model itself is the
runner folder logged beside it as the artifact ``runner_model`` (data, checked by runner.trust)."""

import mlflow

from runner.mlflow_model import RunnerModel

mlflow.models.set_model(RunnerModel())
