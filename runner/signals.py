"""Stopping on request: SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 (SLURM's pre-emption warnings).

Inside the training loop the first signal only sets a flag: the loop finishes the optimizer step it is
in (with its scheduled evaluation, so the resumed run is exact), writes a checkpoint and raises
:class:`Interrupted`. Outside the loop (loading, the step-0 or final evaluation) there is nothing to
save, and :class:`Interrupted` is raised at once. Either way the job marks its MLflow run KILLED and the
process exits with 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C, 138 for SIGUSR1, 140 for
SIGUSR2), unless a launcher had its own handler for that signal (submitit's requeue): it is then called.
A second signal exits at once, with the same code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger("runner")

# SIGUSR2: what submitit (hydra/launcher=slurm) has SLURM send before a time limit or pre-emption
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


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
        self.deferring = False  # True while the training loop runs: it stops at the end of the step

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self.previous:
            return
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)

    @contextlib.contextmanager
    def deferred(self):
        """While inside, a signal is acted on at the end of the optimizer step (the training loop)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def uninstall(self) -> None:
        """Restore the handlers there were; a signal received is then passed on to its earlier handler, if
        that was a program's own (submitit's SIGUSR2 handler requeues the job, which resumes from the
        checkpoint just written)."""
        received, earlier = self.received, self.previous.get(self.received) if self.received else None
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
        self.received = None
        if received and callable(earlier) and earlier not in (signal.default_int_handler, self.handle):
            log.info("passing %s on to the launcher's handler", signal.Signals(received).name)
            earlier(received, None)

    def handle(self, signum: int, frame) -> None:
        """No logging in here: a handler runs between any two bytecodes, possibly inside a log call on the
        same stream ("reentrant call inside BufferedWriter"). The loop announces the stop itself (announce)."""
        if self.received is not None:
            os.write(2, f"second {signal.Signals(signum).name}: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = signum
        if not self.deferring:
            raise Interrupted(signum, f"stopped by {self.name()} outside training: nothing to checkpoint")

    def announce(self) -> None:
        """Called by the training loop after the checkpoint of the step in which a signal arrived."""
        log.warning("%s received: stopped at the end of the optimizer step, with a checkpoint", self.name())

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


STOP = StopRequests()  # signal handlers are process-wide, and so is this
