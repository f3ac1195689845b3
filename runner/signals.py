"""Stopping on request: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM's pre-emption warning).

The first signal only sets a flag; the training loop finishes the optimizer step it is in, writes a
checkpoint and raises :class:`Interrupted`, the job marks its MLflow run KILLED and the process exits
with 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C, 138 for SIGUSR1). A second signal exits
at once, with the same code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("runner")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(BaseException):  # noqa: N818  (like KeyboardInterrupt: not an error of the run)
    """The run was stopped by a signal after writing a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequests:
    """Installs the handlers (main thread only) and remembers the first signal received."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self.previous:
            return
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
        self.received = None

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:
            log.error("second %s: exiting now, without a checkpoint", signal.Signals(signum).name)
            os._exit(128 + signum)
        self.received = signum
        log.warning("%s received: finishing this optimizer step, then checkpointing and stopping "
                    "(send it again to exit at once)", signal.Signals(signum).name)

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


STOP = StopRequests()  # signal handlers are process-wide, and so is this
