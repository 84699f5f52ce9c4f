"""training.state.outputs: the run's locks cover the real path of every directory it writes, and leave nothing
behind (lock files, directories they made) once released."""
import os

import pytest

from common.errors import RunError
from training.state import FileLock, RunDirLock


def test_a_symlinked_checkpoints_dir_cannot_be_shared_by_two_runs(tmp_path):
    shared = tmp_path / "scratch_fs" / "ckpts"
    shared.mkdir(parents=True)
    a, b, c = (tmp_path / n for n in "abc")
    for run in (a, b):
        run.mkdir()
        (run / "checkpoints").symlink_to(shared)       # both runs point at one directory
    c.mkdir()
    (c / "checkpoints").symlink_to(a / "checkpoints")   # through the other run's symlink
    first = RunDirLock(a).acquire()
    try:
        for run in (b, c):
            with pytest.raises(RunError) as e:
                RunDirLock(run).acquire()
            assert str(e.value).startswith(f"train.output_dir={run}: checkpoints/ is the directory {shared}, which "
                                           f"another run writes (in use by pid {os.getpid()} on host ")
            assert "give each run its own checkpoints/ (not a symlink to a shared one)" in str(e.value)
            assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]   # nothing made, nothing left
        (b / "checkpoints").unlink()
        (b / "checkpoints").symlink_to(a)                # checkpoints/ of one run = the other's output directory
        with pytest.raises(RunError, match=f"checkpoints/ is the directory {a}, which another run writes"):
            RunDirLock(b).acquire()
    finally:
        first.release(cleanup=True)
    assert sorted(p.name for p in shared.iterdir()) == [] and sorted(p.name for p in a.iterdir()) == ["checkpoints"]
    RunDirLock(b).acquire().release()                   # free again once the first run ended


def test_a_released_lock_leaves_only_what_the_run_wrote(tmp_path):
    out = tmp_path / "new" / "run"
    lock = RunDirLock(out).acquire()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "tensorboard"]
    assert (out / "checkpoints" / ".lock").is_file()
    lock.release(cleanup=True)
    assert list(tmp_path.iterdir()) == []              # refused early: not even the parent it made
    lock = RunDirLock(out).acquire()
    (out / "train_log.jsonl").write_text("{}\n")
    lock.release(cleanup=True)
    assert sorted(p.name for p in out.iterdir()) == ["train_log.jsonl"]


def test_a_file_lock_refuses_a_second_holder_and_frees_its_path(tmp_path):
    path = tmp_path / ".x.lock"
    first = FileLock(path, lambda holder: RunError(f"held by {holder}")).acquire()
    with pytest.raises(RunError, match=rf"held by pid {os.getpid()} on host "):
        FileLock(path, lambda holder: RunError(f"held by {holder}")).acquire()
    first.release()
    assert not path.exists()
    with FileLock(path, RunError):
        assert path.is_file()
    assert not path.exists()
