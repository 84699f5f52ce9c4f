"""Surviving interruptions: SIGTERM, SIGINT, SIGHUP and SIGUSR1 become a checkpoint at the next step
boundary, a peer that dies or hangs becomes one line naming the last checkpoint, and a test-only pause
hook lets tests kill the process at an exact point instead of relying on timing.

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


# Schedulers warn before a kill with one of these (Slurm: SIGTERM, or SIGUSR1 with --signal; a closed
# terminal or some batch systems: SIGHUP); each means "save and stop".
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class GracefulStop:
    """From creation until `restore()`, the STOP_SIGNALS only set `.signal` (the training loop saves and
    exits at the next step boundary); a second SIGINT interrupts at once, as Ctrl-C does."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

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


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed for want of a peer: NCCL raises DistBackendError, gloo a plain
    RuntimeError from its transport (a peer that died: "Connection reset/closed by peer"; one that hangs:
    "Timed out waiting <n>ms") or DistError."""
    import torch.distributed as dist
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "/gloo/" in str(e))


def peer_failure_message(e: BaseException, rank: int, world_size: int, timeout_s: float, last_checkpoint: str) -> str:
    """One line for a rank whose collective failed: who it is, which peer (knowable only in a world of two),
    the timeout, the last checkpoint and what to do."""
    peer = f"rank {1 - rank}" if world_size == 2 else "another rank"
    why = (str(e).splitlines() or [type(e).__name__])[0]
    why = why.split("] ", 1)[-1][:200]           # gloo prefixes the source file and line
    return (f"rank {rank} of {world_size}: a collective failed because {peer} stopped, died or hung longer than "
            f"train.collective_timeout_s={timeout_s:g} s ({why}); the last checkpoint is {last_checkpoint}; check "
            f"that rank's log, then restart every rank with --resume auto")
