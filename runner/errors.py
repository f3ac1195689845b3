"""Errors meant for the user: printed as one message, without a traceback."""


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
