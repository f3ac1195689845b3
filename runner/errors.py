"""Errors meant for the user (printed as one message, without a traceback), and the outcome of a pruned
search trial, which stops a job without being an error."""


class RunnerError(Exception):
    """Something the user can fix (a path, a column, a config value); the message says what and how.

    Printed as one line without a traceback; ``python -m runner`` exits with ``exit_code``.
    """

    exit_code = 1


class DataError(RunnerError):
    """A data file or column cannot be read as configured."""


class TrainingDiverged(RunnerError):
    """The loss became NaN or infinite; lower train.lr or use precision=fp32."""

    exit_code = 3


class TrialPruned(Exception):  # noqa: N818  (Optuna's own name for the outcome)
    """The search's pruner stopped this trial after ``step``; ``value`` is the last value it reported."""

    def __init__(self, step: int, value: float, unit: str) -> None:
        super().__init__(f"pruned after {unit} {step} (reported {value:.4f}): this trial cannot beat the others")
        self.step, self.value, self.unit = step, value, unit


def check_finite_outputs(arrays) -> None:
    """Bare NaN is not JSON (and a JSON writer may turn it into null): a model output that is not finite is an
    error, never a line other tools cannot read or a silent null (predict, serve, the MLflow model)."""
    import numpy as np

    if not all(bool(np.isfinite(np.asarray(a)).all()) for a in arrays):
        raise RunnerError("the model gave a non-finite output (NaN or inf) for some input: check the model and "
                          "the input")
