"""A run never trusts a corrupt or diverged checkpoint (train_c4.py end to end, one process, CPU fp32):
a flipped byte in a checkpoint's tensor data makes `--resume auto` fall back to the previous verified
checkpoint, and a step that blows the weights up stops the run naming the last checkpoint verified
healthy; in both cases training continues from that checkpoint and ends with the uninterrupted run's
losses, bitwise."""
import subprocess
import sys

import pytest

from ckpt_helpers import flip_tensor_byte
from conftest import REPO, TINY, assert_one_line_error, env, losses
from training.state import read_healthy, read_latest

STEPS = 20
# eval only at the end, so a blown-up step is caught by the next step's loss, not by an evaluation
EVERY = ["train.eval_every=100", "train.save_every=5", "train.keep_last=1"]

# Runs train_c4.py with OptimizerStep patched: after the update of step N every weight moves by
# +-SIZE (finite weights whose next forward gives nan), or, with SIZE inf, one weight becomes inf. Stands in
# for a finite loss whose update blew the weights up.
BLOW_UP = """
import math, sys, torch, train_c4
from training import step
real = step.OptimizerStep.__call__
def call(self, n):
    out = real(self, n)
    if n == {step}:
        size = float("{size}")
        with torch.no_grad():
            for p in self.engine.module.parameters():
                p.add_(size * torch.randn_like(p).sign()) if math.isfinite(size) else p.view(-1)[0].fill_(size)
    return out
step.OptimizerStep.__call__ = call
sys.exit(train_c4.main(sys.argv[1:]))
"""


def run(out, *args, hook=None):
    sets = [*TINY, *EVERY, f"train.max_steps={STEPS}", f"train.output_dir={out}"]
    cmd = ["-c", BLOW_UP.format(step=hook[0], size=hook[1])] if hook else ["train_c4.py"]
    return subprocess.run([sys.executable, *cmd, "--config", "configs/llama_tiny.json",
                           *[a for s in sets for a in ("--set", s)], *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    ok(run(out))
    return out


@pytest.mark.slow
def test_a_flipped_byte_in_a_checkpoint_falls_back_to_the_previous_verified_one(reference, tmp_path):
    out = tmp_path / "run"
    ok(run(out, "--stop-at", "15"))
    ckpts = out / "checkpoints"
    assert read_latest(ckpts) == "step_15" and read_healthy(ckpts) == "step_10"   # step_15: saved, unverified
    bad = ckpts / "step_15" / "mp_rank_00_model_states.pt"
    flip_tensor_byte(bad)
    p = run(out, "--resume", str(ckpts / "step_15"))                        # an explicit path: one line
    assert_one_line_error(p, f"{bad}: does not match its crc32 in manifest.json")
    p = ok(run(out, "--resume", "auto"))
    assert f"warning: skipping checkpoint {ckpts / 'step_15'} (content check failed: {bad}: does not match" in p.stdout
    assert f"resumed from {ckpts / 'step_10'} at step 10" in p.stdout
    assert losses(out) == losses(reference)                 # steps 11-20 as the uninterrupted run: bitwise


@pytest.mark.slow
@pytest.mark.parametrize("size, caught", [
    (1e10, "non-finite loss (nan) at step 11: stopped before updating the weights; last checkpoint verified "
           "healthy: step_5; step_10 was saved but never verified and is kept aside as step_10.diverged"),
    ("inf", "weight or optimizer-state tensor(s) hold inf or NaN after step 10: not saved; last checkpoint "
            "verified healthy: step_5 (")], ids=["huge", "inf"])
def test_a_diverged_step_stops_naming_the_last_healthy_checkpoint_and_resuming_from_it_matches(
        reference, tmp_path, size, caught):
    out = tmp_path / "run"
    p = run(out, hook=(10, size))
    assert_one_line_error(p, caught, "then --resume auto")
    ckpts = out / "checkpoints"
    # keep_last=1 kept step_5 (the verified one) through the save of step 10; `latest` names it again
    assert read_latest(ckpts) == "step_5" and (ckpts / "step_5").is_dir() and not (out / "final").exists()
    assert (ckpts / "step_10.diverged").is_dir() == (size != "inf") and not (ckpts / "step_10").exists()
    p = ok(run(out, "--resume", "auto"))                    # the fault fixed (no hook): continue from step_5
    assert f"resumed from {ckpts / 'step_5'} at step 5" in p.stdout
    assert losses(out) == losses(reference)
    assert read_healthy(ckpts) == "step_20" and (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_non_finite_validation_loss_stops_before_the_save(tmp_path):
    out = tmp_path / "run"
    p = run(out, "--set", "train.eval_every=5", hook=(10, 1e10))
    assert_one_line_error(p, "non-finite validation loss (nan) at step 10: not saved; last checkpoint verified "
                             "healthy: step_5 (")
    ckpts = out / "checkpoints"
    assert [d.name for d in sorted(ckpts.iterdir())] == ["healthy", "latest", "step_5"]


@pytest.mark.slow
def test_resume_auto_refuses_in_one_line_and_loses_nothing(reference, tmp_path):
    """A requeue on another world size, and a directory whose every checkpoint is corrupt: exit 2, one line,
    train_log.jsonl and the checkpoints untouched (never a fresh start over them)."""
    import json
    import shutil

    from training.state import write_manifest
    out = shutil.copytree(reference, tmp_path / "run")
    ckpts = out / "checkpoints"

    def snapshot():
        return (out / "train_log.jsonl").read_bytes(), sorted((p.name, p.stat().st_mtime_ns) for p in ckpts.rglob("*"))
    for d in (p for p in ckpts.iterdir() if p.name.startswith("step_")):
        state = json.loads((d / "trainer_state_rank0.json").read_text())
        (d / "trainer_state_rank0.json").write_text(json.dumps({**state, "world_size": 2}))
        write_manifest(d)
    before = snapshot()
    assert_one_line_error(run(out, "--resume", "auto", "--set", f"train.max_steps={STEPS + 5}"),
                          f"--resume auto: {ckpts / 'step_20'} was written by 2 processes, this run has 1; resume "
                          f"with 2 processes, or export it", "--set train.init_from=DIR")
    assert snapshot() == before
    for d in (p for p in ckpts.iterdir() if p.name.startswith("step_")):
        (d / "trainer_state_rank0.json").write_text("{")
    before = snapshot()
    assert_one_line_error(run(out, "--resume", "auto", "--set", f"train.max_steps={STEPS + 5}"),
                          f"--resume auto: {ckpts} holds checkpoints but none is usable (newest: {ckpts / 'step_20'}")
    assert snapshot() == before
