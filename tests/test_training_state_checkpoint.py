"""Checkpoint bookkeeping without DeepSpeed: which checkpoint a resume picks, pruning, replacing a directory,
RNG states.

Saving and loading through a real engine, and exact resume, are tested end to end in
tests/test_train_c4.py."""
import json
import os
import random

import numpy as np
import pytest
import torch

from training.state import (RUN_CONFIG, atomic_write_text, check_compatible, clean_stale, find_resume, follow_latest,
                            prune, rank_state_name, read_latest, replace_dir, rng_state, set_rng_state, step_dirs,
                            write_manifest)
from training.config import load_config
from common.errors import CheckpointError

TINY = "configs/llama_tiny.json"


def fake_checkpoint(root, step, world=1, cfg=None):
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    torch.save({"module": {}}, d / "mp_rank_00_model_states.pt")
    (cfg or load_config(TINY)).save(d / RUN_CONFIG)
    for r in range(world):
        (d / rank_state_name(r)).write_text(json.dumps({"step": step, "world_size": world}))
    write_manifest(d)
    return d


def test_atomic_write_replaces_whole_file(tmp_path):
    f = tmp_path / "latest"
    atomic_write_text(f, "step_1")
    atomic_write_text(f, "step_2")
    assert f.read_text() == "step_2" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    path, notes = find_resume("auto", tmp_path / "checkpoints", 1)
    assert path is None and "starting fresh" in notes[-1]


def test_resume_auto_takes_latest_and_falls_back_when_it_is_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10)
    newest = fake_checkpoint(root, 20)
    atomic_write_text(root / "latest", "step_20")
    assert find_resume("auto", root, 1) == (newest, [])
    (newest / rank_state_name(0)).unlink()
    path, notes = find_resume("auto", root, 1)
    assert path == root / "step_10"
    assert notes == [f"warning: skipping checkpoint {newest} (missing {rank_state_name(0)})"]


def test_resume_path_forms_and_errors(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    d = fake_checkpoint(root, 5)
    atomic_write_text(root / "latest", "step_5")
    for given in (d, root, tmp_path / "run"):
        assert find_resume(str(given), root, 1)[0] == d
    with pytest.raises(CheckpointError, match="written by 1 processes, this run has 2"):
        find_resume(str(d), root, 2)
    with pytest.raises(CheckpointError) as e:
        find_resume(str(tmp_path / "nope"), root, 1)
    assert "is not a usable checkpoint (does not exist)" in str(e.value) and "\n" not in str(e.value)


def test_prune_keeps_last_k_and_the_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4, 5):
        fake_checkpoint(root, s)
    atomic_write_text(root / "latest", "step_1")  # e.g. after --resume from an old checkpoint
    prune(root, 2)
    assert [p.name for p in step_dirs(root)] == ["step_1", "step_4", "step_5"]
    assert read_latest(root) == "step_1"


def test_clean_stale_removes_only_the_recorded_leftovers_of_interrupted_saves(tmp_path):
    from training.state import scratch
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 3)
    scratch.claim(root / "step_4.tmp").mkdir()         # what a killed save and a killed prune leave
    (root / "step_4.tmp" / "mp_rank_00_model_states.pt").write_bytes(b"PK")
    scratch.claim(root / "step_1.trash").mkdir()
    for mine in ("notes.tmp", "step_2.trash", "old.trash"):  # the user's, however named
        (root / mine).mkdir()
    assert sorted(clean_stale(root)) == ["step_1.trash", "step_4.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.tmp", "old.trash", "step_2.trash", "step_3"]
    with pytest.raises(CheckpointError, match=r"step_2.trash: exists but was not made by this project .*; move "
                                              r"it out of "):
        scratch.claim(root / "step_2.trash")
    assert (root / "step_2.trash").is_dir() and not (root / scratch.RECORD).exists()


def test_resume_and_load_resolve_the_same_path_forms(tmp_path):
    from training.hf import resolve_checkpoint
    root = tmp_path / "run" / "checkpoints"
    d = fake_checkpoint(root, 5)
    fake_checkpoint(root, 7)
    atomic_write_text(root / "latest", "step_5")
    for given in (d, root, tmp_path / "run"):
        assert follow_latest(given) == d and find_resume(str(given), root, 1)[0] == d
        assert resolve_checkpoint(given).dir == d and resolve_checkpoint(given).kind == "deepspeed"


def test_replace_dir_leaves_only_recorded_names_behind_and_puts_the_old_one_back_on_failure(tmp_path, monkeypatch):
    final, new = tmp_path / "step_1", tmp_path / "step_1.tmp"

    def make(d, text):
        d.mkdir()
        (d / "f").write_text(text)
    make(final, "old"), make(new, "new")
    seen = []
    assert replace_dir(new, final, lambda: seen.append(sorted(p.name for p in tmp_path.iterdir()))) is None
    assert seen == [[".scratch", "step_1", "step_1.trash"]]            # the old one, recorded until it is gone
    assert (final / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    make(new, "killed")

    def killed():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):                             # a kill before the old one is deleted
        replace_dir(new, final, killed)
    assert clean_stale(tmp_path) == ["step_1.trash"] and (final / "f").read_text() == "killed"
    (tmp_path / "step_1.trash").mkdir()                                # the user's: never touched
    make(new, "newer")
    with pytest.raises(CheckpointError, match="step_1.trash: exists but was not made by this project"):
        replace_dir(new, final)
    assert (final / "f").read_text() == "killed" and (tmp_path / "step_1.trash").is_dir()
    (tmp_path / "step_1.trash").rmdir()
    real = os.replace

    def replace(src, dst):
        if src == new:
            raise OSError(5, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        replace_dir(new, final)
    assert (final / "f").read_text() == "killed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_1.tmp"]


def test_check_compatible_refuses_another_model_and_notes_other_changes(tmp_path):
    d = fake_checkpoint(tmp_path / "checkpoints", 1)
    assert check_compatible(d, load_config(TINY)) == []
    assert check_compatible(d, load_config(TINY, ["train.max_steps=999"])) == [
        "note: resuming with changed settings: train.max_steps"]
    with pytest.raises(CheckpointError) as e:
        check_compatible(d, load_config(TINY, ["model.num_hidden_layers=2", "velora.targets=paper"]))
    assert "model differs from this run's in model.num_hidden_layers" in str(e.value)


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_rng_state_holds_only_the_current_cuda_devices_state(monkeypatch):
    """On a GPU each rank saves and restores its own device's CUDA generator only (simulated here: the
    per-device functions are replaced by one fake device's; the all-device ones must not be called)."""
    device_state = {"now": torch.arange(16, dtype=torch.uint8)}

    def refuse(*args):
        raise AssertionError("every device's CUDA RNG state was read or written")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t: device_state.update(now=t.clone()))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    state = json.loads(json.dumps(rng_state()))
    assert state["cuda"] == list(range(16))
    device_state["now"] = torch.zeros(16, dtype=torch.uint8)
    set_rng_state(state)
    assert torch.equal(device_state["now"], torch.arange(16, dtype=torch.uint8))
