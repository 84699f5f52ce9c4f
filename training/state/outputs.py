"""The output directory of a run: checked before anything starts, and held by a kernel lock while the run
writes to it, so that two processes (two runs, or a requeued job while the old one still runs) never
write one directory. A dead process holds no lock (the kernel drops it), so no stale lock survives a crash.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

from .tags import read_latest, step_dirs
from common.errors import RunError
from .files import make_dirs, remove_empty_dirs
from .layout import LOCK, RunDir


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


class FileLock:
    """An exclusive, non-blocking flock on the file `path` (created when missing) that holds the holder's pid
    and host; `refuse(holder)` builds the error a second comer gets. `release()` removes the file while still
    holding it: a process that opened the old file in between finds, once it holds the lock, that the path no
    longer names that file, and starts over on the new one, so no two processes ever hold one path."""

    def __init__(self, path: Path, refuse):
        self.path, self.refuse, self._fd = Path(path), refuse, None

    def acquire(self) -> "FileLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise self.refuse(holder) from None
            try:
                now = os.stat(self.path)
                mine = os.fstat(fd)
                if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunDirLock:
    """Exclusive locks (FileLock) on `.lock` in the real path of every directory a run writes: the output
    directory, `checkpoints/` and `tensorboard/`. A `checkpoints/` that is a symlink to a directory another
    run also writes (directly or through its own symlink) is therefore refused like a shared output
    directory. `release(cleanup=True)` also removes the directories acquire() created that are still empty
    (a run refused early leaves nothing behind)."""

    def __init__(self, output_dir: str | Path):
        self.dir = RunDir(Path(output_dir).absolute())
        self._locks: list[FileLock] = []
        self._made: list[Path] = []        # the directories acquire() created, outermost first

    def _in_use(self, d: Path, real: Path, holder: str) -> RunError:
        if d == self.dir.root:
            return RunError(f"train.output_dir={self.dir.root} is in use by {holder}; wait for that run to end or "
                            f"stop it, or choose another train.output_dir")
        return RunError(f"train.output_dir={self.dir.root}: {d.name}/ is the directory {real}, which another run "
                        f"writes (in use by {holder}); give each run its own {d.name}/ (not a symlink to a "
                        f"shared one), or wait for that run to end")

    def acquire(self) -> "RunDirLock":
        try:
            held = set()
            for d in (self.dir.root, self.dir.checkpoints, self.dir.tensorboard):
                self._made += make_dirs(d)
                real = d.resolve()
                if real not in held:
                    held.add(real)
                    self._locks.append(FileLock(real / LOCK, lambda h, d=d, r=real: self._in_use(d, r, h)).acquire())
        except BaseException:
            self.release(cleanup=True)
            raise
        return self

    def release(self, cleanup: bool = False) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []
        if cleanup:
            remove_empty_dirs(self._made)   # only the empty ones: what the run wrote there stays
        self._made = []
