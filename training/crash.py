"""Surviving interruptions: SIGTERM/SIGINT become a checkpoint at the next step boundary, and a
test-only pause hook lets tests kill the process at an exact point instead of relying on timing.

The hook has one caller, `TrainingRun._phase`, which the run (and the step and checkpoint code, through
the callbacks it hands them) calls at every interruptible point.
"""
from __future__ import annotations

import os
import signal
import time

PAUSE_ENV, MARKER_ENV = "VELORA_TEST_PAUSE_AT", "VELORA_TEST_PAUSE_MARKER"


def pause_point(name: str, step: int) -> None:
    """TEST ONLY. With VELORA_TEST_PAUSE_AT=<name>:<step> (e.g. `checkpoint_write:10`, `eval:10`,
    `step:13`), append this process's pid to the file VELORA_TEST_PAUSE_MARKER and sleep until
    killed, so a test can SIGKILL the run exactly here. Points: `step` (mid-step: gradients
    computed, not yet applied), `eval` (validation done, not yet logged), `checkpoint_write` (files
    in step_N.tmp/, not renamed), `checkpoint_commit` (rank 0 only: step_N/ renamed, `latest` not
    yet updated). Unset: does nothing."""
    if os.environ.get(PAUSE_ENV) != f"{name}:{step}":
        return
    with open(os.environ.get(MARKER_ENV, "velora_paused"), "a") as f:  # one line per paused process
        f.write(f"{os.getpid()}\n")
    while True:
        time.sleep(3600)


class GracefulStop:
    """From creation until `restore()`, SIGTERM and SIGINT only set `.signal` (the training loop
    saves and exits at the next step boundary); a second SIGINT interrupts at once, as Ctrl-C does."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None
