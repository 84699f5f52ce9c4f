"""Writes that survive a kill at any instant: readers see the old file or the whole new one, and a
write that fails (a full disk) leaves no partial file behind; directories made for a write are known, so
a failed one removes exactly those."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` with the guarantees of `atomic_write_text`."""
    with open(src, "rb") as s:
        _atomic(dst, lambda f: shutil.copyfileobj(s, f))


def make_dirs(d: Path) -> list[Path]:
    """Create `d` and its missing ancestors; return the directories made, outermost first (a failure
    removes them again)."""
    missing, d = [], Path(d)
    while not os.path.lexists(d):
        missing.append(d)
        d = d.parent
    made = []
    try:
        for m in reversed(missing):
            m.mkdir()
            made.append(m)
    except BaseException:
        remove_empty_dirs(made)
        raise
    return made


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove those of `dirs` (outermost first, as `make_dirs` returns them) that are empty, innermost first."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            pass


def same_file(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes."""
    return Path(a).read_bytes() == Path(b).read_bytes()
