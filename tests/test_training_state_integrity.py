"""training.state.integrity and the checks built on it, without DeepSpeed: every file of a checkpoint or export
is hashed into manifest.json; any change is caught on load (one line for an explicit path, a fallback for
`--resume auto`); directories written before manifests existed are read with a warning."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ckpt_helpers import exported_run, flip_tensor_byte
from conftest import REPO, env
from test_training_state_checkpoint import fake_checkpoint
from training.state import MANIFEST, file_crc32, find_resume, has_manifest, problem, verify, write_manifest
from common.errors import CheckpointError
from training.hf import load_model


def test_manifest_lists_every_file_and_catches_each_kind_of_change(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(bytes(range(256)) * 100)
    (d / "sub" / "b.json").write_text("{}")
    write_manifest(d)
    listed = json.loads((d / MANIFEST).read_text())
    assert listed["algorithm"] == "crc32" and sorted(listed["files"]) == ["a.bin", "sub/b.json"]
    assert listed["files"]["a.bin"] == {"bytes": 25600, "crc32": file_crc32(d / "a.bin")}
    assert verify(d) is None and has_manifest(d)

    data = bytearray((d / "a.bin").read_bytes())
    data[12345] ^= 1                                        # one flipped bit, same size
    (d / "a.bin").write_bytes(bytes(data))
    assert verify(d) == f"{d / 'a.bin'}: does not match its crc32 in manifest.json (its bytes changed after it " \
                        f"was written)"
    os.truncate(d / "a.bin", 100)
    assert verify(d) == f"{d / 'a.bin'}: 100 bytes, manifest.json says 25600 (truncated or replaced)"
    (d / "a.bin").unlink()
    assert verify(d) == f"{d / 'a.bin'}: listed in manifest.json but missing"
    write_manifest(d)
    (d / "extra.pt").write_bytes(b"x")
    assert verify(d) == f"{d / 'extra.pt'}: not listed in manifest.json (added after the directory was written)"
    (d / MANIFEST).write_text("{")
    assert verify(d).startswith(f"{d / MANIFEST}: unreadable (JSONDecodeError")
    (d / MANIFEST).unlink()
    assert verify(d) is None and not has_manifest(d)        # written before manifests: accepted (see load)


# --- --resume auto falls back past a corrupt checkpoint; an explicit path fails; nothing is trained over ---

def test_resume_auto_falls_back_past_a_flipped_byte_and_an_explicit_path_fails(tmp_path):
    root = tmp_path / "checkpoints"
    older, newest = fake_checkpoint(root, 5), fake_checkpoint(root, 10)
    (root / "latest").write_text("step_10")
    bad = newest / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.arange(1000.0)}}, bad)
    write_manifest(newest)
    flip_tensor_byte(bad)
    why = f"content check failed: {bad}: does not match its crc32 in manifest.json"
    assert problem(newest, 1).startswith(why)
    path, notes = find_resume("auto", root, 1)
    assert path == older and len(notes) == 1 and notes[0].startswith(f"warning: skipping checkpoint {newest} ({why}")
    with pytest.raises(CheckpointError) as e:
        find_resume(str(newest), root, 1)
    assert str(e.value).startswith(f"--resume {newest}: {newest} is not a usable checkpoint ({why}")
    assert "\n" not in str(e.value)


def test_resume_auto_refuses_when_no_checkpoint_is_usable(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (5, 10):
        (fake_checkpoint(root, s) / "trainer_state_rank0.json").write_text("{")    # unreadable in every one
    with pytest.raises(CheckpointError) as e:
        find_resume("auto", root, 1)
    assert str(e.value).startswith(f"--resume auto: {root} holds checkpoints but none is usable (newest: "
                                   f"{root / 'step_10'} (unreadable trainer_state_rank0.json")
    assert str(e.value).endswith(f"nothing was trained or overwritten: resume from a good copy with --resume PATH, "
                                 f"or move {root} away to start over") and "\n" not in str(e.value)
    shutil.rmtree(root / "step_5"), shutil.rmtree(root / "step_10")
    (root / "latest").write_text("step_10")                # checkpoints existed: still not a fresh start
    with pytest.raises(CheckpointError, match="holds checkpoints but none is usable; nothing was trained"):
        find_resume("auto", root, 1)
    (root / "latest").unlink()
    assert find_resume("auto", root, 1) == (None, [f"--resume auto: no checkpoint in {root}; starting fresh"])


def test_resume_auto_on_another_world_size_is_refused_naming_both_ways_on(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 5, world=1)
    newest = fake_checkpoint(root, 10, world=2)
    with pytest.raises(CheckpointError) as e:
        find_resume("auto", root, 1)
    assert str(e.value) == (f"--resume auto: {newest} was written by 2 processes, this run has 1; resume with 2 "
                            f"processes, or export it (scripts/export_hf.py --checkpoint {newest} --out DIR) and "
                            f"start a new run from the export with --set train.init_from=DIR; nothing was trained "
                            f"or overwritten")


def test_a_checkpoint_without_manifest_is_resumed_with_a_warning(tmp_path):
    root = tmp_path / "checkpoints"
    d = fake_checkpoint(root, 5)
    (d / MANIFEST).unlink()
    path, notes = find_resume("auto", root, 1)
    assert path == d and notes == [f"warning: {d} has no manifest.json (written before checkpoints recorded "
                                   f"content hashes); its files cannot be verified, reading them as they are"]


# --- exports: written with a manifest, verified by load / eval / export; non-finite weights refused ---

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return exported_run(tmp_path_factory.mktemp("export"))


def test_export_has_a_manifest_and_a_flipped_byte_fails_every_reader(setup, tmp_path):
    final = shutil.copytree(setup["final"], tmp_path / "final")
    assert verify(final) is None and has_manifest(final)
    weights = final / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10                                     # inside the last tensor's data
    weights.write_bytes(bytes(data))
    msg = f"{weights}: does not match its crc32 in manifest.json"
    with pytest.raises(CheckpointError, match="the checkpoint is corrupt: use another one") as e:
        load_model(final)
    assert str(e.value).startswith(msg)
    for script, args in (("eval_ppl.py", ["--data", "builtin"]), ("export_hf.py", ["--out", tmp_path / "x"])):
        p = subprocess.run([sys.executable, f"scripts/{script}", "--checkpoint", final, *map(str, args)], cwd=REPO,
                           env=env(), capture_output=True, text=True, timeout=300)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith(f"{script}: error: ")]
        assert p.returncode == 2 and len(errors) == 1 and msg in errors[0], p.stderr
    assert not (tmp_path / "x").exists()


def test_an_export_without_manifest_loads_with_a_warning(setup, tmp_path, caplog):
    final = shutil.copytree(setup["final"], tmp_path / "final")
    (final / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        load_model(final)
    assert f"warning: {final} has no manifest.json" in caplog.text


def test_non_finite_weights_are_refused_by_export_and_load_unless_allowed(setup, tmp_path):
    from training.hf import save_final
    sd = {k: v.clone() for k, v in setup["model"].state_dict().items()}
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    out = tmp_path / "exp"
    with pytest.raises(CheckpointError) as e:
        save_final(sd, setup["rc"], setup["tok"], out)
    assert str(e.value) == (f"the model being exported to {out}: 1 weight tensor(s) hold inf or NaN (e.g. "
                            f"model.layers.1.mlp.down_proj.weight); the weights diverged: use an earlier checkpoint, "
                            f"or pass --allow-nonfinite to go on anyway")
    assert not out.exists()
    save_final(sd, setup["rc"], setup["tok"], out, allow_nonfinite=True)
    with pytest.raises(CheckpointError, match=r"model.safetensors: 1 weight tensor\(s\) hold inf or NaN"):
        load_model(out)
    model, _, _ = load_model(out, allow_nonfinite=True)
    assert torch.isnan(model.model.layers[1].mlp.down_proj.weight[0, 0])
