"""The output directory of a run: checked before anything starts, and held by a kernel lock while the run
writes to it, so that two processes (two runs, or a requeued job while the old one still runs) never
write one directory. A dead process holds no lock (the kernel drops it), so no stale lock survives a crash.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .checkpoint import read_latest, step_dirs
from .errors import RunError
from .layout import RunDir


def check_output_dir(output_dir: str, resume: str | None) -> None:
    """Fail before anything starts when the output directory cannot be written, or when it already
    holds a run that this command would overwrite or mix with another."""
    path = Path(output_dir).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a directory")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise RunError(f"train.output_dir={output_dir}: not writable ({e.strerror or e}); choose another with "
                       f"--set train.output_dir=DIR") from None
    ckpt_root = RunDir(path).checkpoints
    held = read_latest(ckpt_root, strict=False) or (step_dirs(ckpt_root)[-1].name if step_dirs(ckpt_root) else None)
    if held is None:
        return
    if resume is None:
        raise RunError(f"train.output_dir={output_dir} already holds checkpoints (latest: {held}); continue that "
                       f"run with --resume auto, or start a new one with --set train.output_dir=NEW_DIR")
    if resume != "auto" and not _inside(Path(resume), path):
        raise RunError(f"--resume {resume} continues another run, but train.output_dir={output_dir} already holds "
                       f"checkpoints (latest: {held}) that this run would replace; set train.output_dir to a new "
                       f"directory, or resume that run with --resume auto")


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.absolute().resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


class RunDirLock:
    """An exclusive flock on `<output_dir>/.lock`, holding the holder's pid and host for the message the
    second writer gets. `release(cleanup=True)` also removes the directory when this lock created it and
    nothing else was written there (a run refused early leaves nothing behind)."""

    def __init__(self, output_dir: str | Path):
        self.dir = RunDir(Path(output_dir).absolute())
        top = self.dir.root
        while not top.parent.exists():
            top = top.parent
        self._created = top if not top.exists() else None     # the highest directory acquire() will create
        self._fd = None

    def acquire(self) -> "RunDirLock":
        self.dir.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"train.output_dir={self.dir.root} is in use by {holder}; wait for that run to end or "
                           f"stop it, or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self._fd = fd
        return self

    def release(self, cleanup: bool = False) -> None:
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if cleanup and self._created is not None:
            files = [p for p in self._created.rglob("*") if not p.is_dir()]
            if files == [self.dir.lock]:
                shutil.rmtree(self._created)
