"""Names a run creates for a moment beside what it keeps (a checkpoint being written, `step_N.tmp/`; one being
replaced or deleted, `step_N.trash/`) are recorded in `<dir>/.scratch` before they are created and dropped
from the record once gone. A killed run leaves the record behind; the next run deletes exactly the recorded
names (`clean`) and nothing else of the directory, whatever the other names look like. `replace_dir` and
`remove_dir`, the one way this project replaces or deletes a directory it keeps (checkpoints, exports),
go through such names."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from common.errors import CheckpointError
from .files import atomic_write_text, fsync_dir

RECORD = ".scratch"


def _names(d: Path) -> list[str]:
    f = d / RECORD
    return f.read_text().split("\n")[:-1] if f.is_file() else []


def _write(d: Path, names: list[str]) -> None:
    if names:
        atomic_write_text(d / RECORD, "".join(n + "\n" for n in names))
    elif (d / RECORD).exists():
        (d / RECORD).unlink()
        fsync_dir(d)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def claim(path: Path) -> Path:
    """Record `path` as this project's scratch before creating it; a recorded leftover of a killed run is
    removed. A `path` that exists without being recorded is not ours: CheckpointError, nothing touched."""
    d, names = path.parent, _names(path.parent)
    if path.name in names:
        _remove(path)
    elif path.exists() or path.is_symlink():
        raise CheckpointError(f"{path}: exists but was not made by this project (it is not recorded in "
                              f"{d / RECORD}); move it out of {d}, then run again")
    else:
        _write(d, names + [path.name])
    return path


def drop(path: Path) -> None:
    """Forget `path` (it was renamed into place or deleted)."""
    names = _names(path.parent)
    if path.name in names:
        _write(path.parent, [n for n in names if n != path.name])


def clean(d: Path) -> list[str]:
    """Delete the recorded scratch of `d` that still exists (leftovers of a killed run); return the names."""
    names = _names(d)
    gone = [n for n in names if (d / n).exists() or (d / n).is_symlink()]
    for n in gone:
        _remove(d / n)
    _write(d, [])
    return gone


def trash_of(path: Path) -> Path:
    """The recorded name `path` is renamed to while `replace_dir` or `remove_dir` deletes it."""
    return path.with_name(path.name + ".trash")


def _discard(trash: Path) -> Path | None:
    """Delete a renamed-away directory; its name stays recorded until it is gone (a failure is retried by the
    next `clean`). Returns `trash` when it is still there."""
    shutil.rmtree(trash, ignore_errors=True)
    if os.path.lexists(trash):
        return trash
    drop(trash)
    return None


def remove_dir(path: Path) -> Path | None:
    """Delete the directory `path` so that a half-deleted one never shows under its name: it is renamed to a
    recorded `<name>.trash` first. Returns the trash directory when it could not be deleted, else None."""
    trash = claim(trash_of(path))
    os.replace(path, trash)
    return _discard(trash)


def replace_dir(tmp: Path, final: Path, on_installed=None) -> Path | None:
    """Rename the complete directory `tmp` to `final`, replacing an earlier `final`: that one is renamed to a
    recorded `<name>.trash` first, put back when the second rename fails, and deleted once the new one is in
    place and `on_installed()` (e.g. pointing `latest` at it) has run. The parent directory is fsynced after
    the rename and `tmp`'s record, if it has one, dropped. Returns the old directory when it could not be
    deleted (it stays recorded, so `clean` removes it later), else None."""
    trash = trash_of(final) if os.path.lexists(final) else None
    if trash:
        os.replace(final, claim(trash))
    try:
        os.replace(tmp, final)
    except OSError:
        if trash:
            os.replace(trash, final)
            drop(trash)
        raise
    fsync_dir(final.parent)
    drop(tmp)
    if on_installed is not None:
        on_installed()
    return _discard(trash) if trash else None
