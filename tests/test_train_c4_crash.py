"""Crash safety of train_c4.py: SIGKILL at exact points (the VELORA_TEST_PAUSE_AT hook) and
`--resume auto` reproduce the uninterrupted losses bitwise (one process, CPU fp32; plain AdamW and
VeLoRA + GaLore) and within 1e-6 (two processes, ZeRO 2); SIGTERM/SIGINT
save and exit 0; a failed save stops the run with the previous checkpoint intact.

train_log.jsonl after a kill: the resumed run drops every record past the step it restored (and a
line cut short by the kill), so the log reads as one run; the test asserts exactly one record per
step rather than taking the last record per step, which would hide duplicates.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, assert_one_line_error, env, free_port, losses
from training.state import (RUN_CONFIG, find_resume, problem, rank_state_name, read_latest, save_checkpoint,
                            write_manifest)
from training.config import load_config
from training.crash import STOP_SIGNALS, GracefulStop
from common.errors import CheckpointError
from training.metrics import truncate_log

STEPS = 20
EVERY = ["train.eval_every=5", "train.save_every=5", "train.keep_last=3"]


def records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# Besides plain AdamW: VeLoRA's v buffers and GaLore's projectors (refreshed every 3 steps, so across
# every resume point) must come back from the checkpoint too.
VARIANTS = {"adamw": [], "velora_galore": ["velora.targets=all", "velora.sub_token_size=8", "optim.name=galore_adamw",
                                           "optim.galore_rank=8", "optim.galore_update_proj_gap=3"]}


def start(out, *args, pause=None, variant="adamw", launcher=()):
    """Start train_c4.py in the background (the tiny model of test_train_c4), in its own process group."""
    sets = [*TINY, *EVERY, *VARIANTS[variant], f"train.max_steps={STEPS}", f"train.output_dir={out}"]
    e = env()
    if pause:
        e |= {"VELORA_TEST_PAUSE_AT": pause, "VELORA_TEST_PAUSE_MARKER": str(out.parent / "paused")}
    cmd = [*(launcher or [sys.executable]), "train_c4.py", "--config", "configs/llama_tiny.json",
           *[a for s in sets for a in ("--set", s)], *args]
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_at(out, pause, *args, variant="adamw", launcher=(), ranks=1):
    """Run until all `ranks` processes sit at the pause point `pause`, then SIGKILL them (and the launcher)."""
    marker = out.parent / "paused"
    marker.unlink(missing_ok=True)
    p = start(out, *args, pause=pause, variant=variant, launcher=launcher)
    deadline = time.monotonic() + 300  # an upper bound only: the kill waits for the marker, not a delay
    while len(pids := marker.read_text().split() if marker.exists() else []) < ranks:
        if p.poll() is not None or time.monotonic() > deadline:
            for pid in [p.pid, *map(int, pids)]:
                os.killpg(pid, signal.SIGKILL)
            pytest.fail(f"never reached {pause}: rc {p.returncode}\n" + "".join(p.communicate())[-3000:])
        time.sleep(0.05)
    for pid in pids:  # torchrun starts each rank in a session of its own
        os.kill(int(pid), signal.SIGKILL)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = start(out, variant=request.param)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return out, request.param


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_auto_reproduces_the_run_bitwise(reference, tmp_path):
    reference, variant = reference
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    # (pause point, what `latest` must name right after the kill)
    kills = [("step:8", "step_5"),               # mid-step: gradients computed, not applied
             ("eval:10", "step_5"),              # validation done, not yet logged or saved
             ("checkpoint_write:10", "step_5"),  # files written into step_10.tmp/
             ("checkpoint_commit:15", "step_10")]  # step_15/ renamed in, latest not yet updated
    for i, (pause, latest) in enumerate(kills):
        kill_at(out, pause, *(["--resume", "auto"] if i else []), variant=variant)
        assert read_latest(ckpts) == latest, pause
        assert problem(ckpts / latest, 1) is None, pause  # latest always names a complete checkpoint
    assert (ckpts / "step_15").is_dir()  # complete but not yet named by latest: resume redoes step 15
    p = start(out, "--resume", "auto", variant=variant)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "resumed from" in stdout and "at step 10" in stdout

    got, want = records(out), records(reference)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]  # no duplicates
    assert losses(out) == losses(reference)  # bitwise: float equality of every step's loss
    evals = lambda rs: [(r["step"], r["loss"], r["galore_ppl"]) for r in rs if r["kind"] == "eval"]  # noqa: E731
    assert evals(got) == evals(want)
    assert sorted(p.name for p in ckpts.iterdir()) == ["healthy", "latest", "step_10", "step_15", "step_20"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_sigkill_in_a_checkpoint_write_then_resume(tmp_path):
    """torchrun x 2, ZeRO 2 (partitioned optimizer state, a data position per rank): losses within 1e-6."""
    def run(out, *args, pause=None):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port())]
        sets = ["--set", "deepspeed.zero_optimization.stage=2"]
        if pause:
            return kill_at(out, pause, *sets, *args, launcher=launcher, ranks=2)
        p = start(out, *sets, *args, launcher=launcher)
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]

    ref, out = tmp_path / "ref", tmp_path / "run"
    run(ref)
    run(out, pause="checkpoint_write:10")
    assert read_latest(out / "checkpoints") == "step_5" and problem(out / "checkpoints" / "step_5", 2) is None
    run(out, "--resume", "auto")
    got, want = losses(out), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), (s, got[s], want[s])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_sigterm_and_sigint_save_at_the_next_step_and_exit_0(tmp_path, sig):
    out = tmp_path / "run"
    p = start(out, "--set", "train.max_steps=100000")
    deadline = time.monotonic() + 300
    while not ((out / "train_log.jsonl").is_file() and len(records(out)) >= 2):
        assert p.poll() is None and time.monotonic() < deadline, "".join(p.communicate())[-3000:]
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    step = records(out)[-1]["step"]
    assert f"stopped after step {step} ({sig.name}); checkpoint step_{step} saved; continue with --resume auto" \
        in stdout
    assert read_latest(out / "checkpoints") == f"step_{step}" and not (out / "final").exists()
    assert problem(out / "checkpoints" / f"step_{step}", 1) is None


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=[s.name for s in STOP_SIGNALS])
def test_every_scheduler_warning_signal_asks_for_a_save_and_nothing_else(sig):
    before = signal.getsignal(sig)
    stop = GracefulStop()
    try:
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.signal == sig.name
    finally:
        stop.restore()
    assert signal.getsignal(sig) == before
    assert {signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM} <= set(STOP_SIGNALS)


# torch.save reports a full disk as RuntimeError from its zip writer; Python file calls as OSError.
# kind: (the exception the patched torch.save raises, what the message quotes of it)
FULL_DISK = {"oserror": ("OSError(errno.ENOSPC, 'No space left on device')", "No space left on device"),
             "runtimeerror": ("RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')",
                              "PytorchStreamWriter failed writing file data/0: file write failed")}


@pytest.mark.parametrize("kind", FULL_DISK)
def test_failed_save_stops_keeping_the_previous_checkpoint(tmp_path, kind):
    """The disk 'fills' at step 10: torch.save writes half a file into step_10.tmp/ and fails."""
    out = tmp_path / "run"
    code = (f"import errno, sys, torch, train_c4\n"
            f"real = torch.save\n"
            f"def save(obj, f, *a, **k):\n"
            f"    if 'step_10' in str(f):\n"
            f"        open(f, 'wb').write(b'PK half a file')\n"
            f"        raise {FULL_DISK[kind][0]}\n"
            f"    return real(obj, f, *a, **k)\n"
            f"torch.save = save\n"
            f"sys.exit(train_c4.main(sys.argv[1:]))\n")
    sets = [*TINY, *EVERY, f"train.max_steps={STEPS}", f"train.output_dir={out}"]
    p = subprocess.run([sys.executable, "-c", code, "--config", "configs/llama_tiny.json",
                        *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=600)
    why = FULL_DISK[kind][1]
    assert_one_line_error(p, f"saving checkpoint step_10 in {out / 'checkpoints'} failed ({why}); the previous "
                             f"checkpoint step_5 is intact; free space or fix permissions, then resume with "
                             f"--resume auto")
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["healthy", "latest", "step_5"]  # no .tmp
    assert read_latest(out / "checkpoints") == "step_5" and not (out / "final").exists()
    assert max(r["step"] for r in records(out)) == 10  # stopped: no step after the failed save


# --- in-process pieces ---

def fake_checkpoint(root, step):
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    torch.save({"module": {}}, d / "mp_rank_00_model_states.pt")
    load_config("configs/llama_tiny.json").save(d / RUN_CONFIG)
    (d / rank_state_name(0)).write_text(json.dumps({"step": step, "world_size": 1}))
    write_manifest(d)
    return d


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(
        (d / "mp_rank_00_model_states.pt").read_bytes()[:100]), "truncated or unreadable mp_rank_00_model_states.pt"),
    (lambda d: (d / rank_state_name(0)).write_text('{"step": 2, "wor'), f"unreadable {rank_state_name(0)}"),
    (lambda d: (d / RUN_CONFIG).write_text("{"), f"unreadable {RUN_CONFIG}"),
    (lambda d: (d / RUN_CONFIG).unlink(), f"missing {RUN_CONFIG}"),
])
def test_resume_auto_skips_a_damaged_latest_and_says_why(tmp_path, damage, why):
    root = tmp_path / "checkpoints"
    older, newest = fake_checkpoint(root, 1), fake_checkpoint(root, 2)
    (root / "latest").write_text("step_2")
    damage(newest)
    path, notes = find_resume("auto", root, 1)
    assert path == older and len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith(f"warning: skipping checkpoint {newest} ({why}")
    with pytest.raises(CheckpointError, match="is not a usable checkpoint"):
        find_resume(str(newest), root, 1)


class FailingEngine:
    """Stands in for a DeepSpeed engine whose disk fills halfway through writing a checkpoint."""

    def save_checkpoint(self, save_dir, tag, **kw):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_save_removes_its_temporary_directory(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 5)
    (root / "latest").write_text("step_5")
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(FailingEngine(), root, 10, {}, rank=0, run_config=None, tokenizer_path=None, keep_last=2)
    assert str(e.value) == (f"saving checkpoint step_10 in {root} failed (No space left on device); the previous "
                            f"checkpoint step_5 is intact; free space or fix permissions, then resume with "
                            f"--resume auto")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_5"]


def test_a_peer_that_dies_during_a_save_is_not_blamed_on_the_disk(tmp_path):
    class PeerGone(FailingEngine):
        def save_checkpoint(self, save_dir, tag, **kw):
            raise RuntimeError("[/x/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    root = tmp_path / "checkpoints"
    with pytest.raises(RuntimeError, match="Connection reset by peer") as e:
        save_checkpoint(PeerGone(), root, 10, {}, rank=1, run_config=None, tokenizer_path=None, keep_last=2)
    assert not isinstance(e.value, CheckpointError)     # the run turns it into the peer-failure line


def test_resumed_log_drops_records_past_the_restored_step_and_a_cut_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"kind": "train", "step": s}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + "\n" + '{"kind": "train", "st')  # killed mid-write
    truncate_log(log, 2)
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs_and_a_dead_one_holds_nothing(tmp_path):
    out = tmp_path / "run"
    marker = out.parent / "paused"
    first = start(out, pause="step:3")
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert first.poll() is None and time.monotonic() < deadline, "".join(first.communicate())[-3000:]
        time.sleep(0.05)
    for args in ([], ["--resume", "auto"]):           # a second run, and a requeued job while the first lives
        second = start(out, *args)
        stdout, stderr = second.communicate(timeout=300)
        p = subprocess.CompletedProcess(second.args, second.returncode, stdout, stderr)
        assert_one_line_error(p, f"train.output_dir={out} is in use by pid {first.pid} on host ")
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    resumed = start(out, "--resume", "auto")           # the kernel dropped the dead process's lock
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stdout[-3000:] + stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["hangs", "dies"])
def test_a_peer_that_hangs_or_dies_ends_the_other_rank_within_the_timeout_naming_the_last_checkpoint(tmp_path, fault):
    """Two ranks started as a launcher would (RANK/WORLD_SIZE/MASTER_*); rank 1 stops mid-step 3 (gradients
    reduced, the loss not yet: the pause hook) and then stays stopped or is killed. Rank 0 waits in the
    loss all-reduce and must end, in one line, within train.collective_timeout_s."""
    out, marker, timeout_s = tmp_path / "run", tmp_path / "paused", 20
    sets = [*TINY, *EVERY, "train.save_every=2", f"train.collective_timeout_s={timeout_s}", f"train.max_steps={STEPS}",
            f"train.output_dir={out}"]
    cmd = [sys.executable, "train_c4.py", "--config", "configs/llama_tiny.json",
           *[a for s in sets for a in ("--set", s)]]
    common = env() | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen(cmd, cwd=REPO, env=common | {"RANK": str(r), "LOCAL_RANK": str(r)} | (
        {"VELORA_TEST_PAUSE_AT": "step:3", "VELORA_TEST_PAUSE_MARKER": str(marker)} if r else {}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert ranks[0].poll() is None and time.monotonic() < deadline, "".join(ranks[0].communicate())[-3000:]
            time.sleep(0.05)
        paused_at = time.monotonic()
        if fault == "dies":
            os.killpg(ranks[1].pid, signal.SIGKILL)
        stdout, stderr = ranks[0].communicate(timeout=timeout_s + 60)
        took = time.monotonic() - paused_at
    finally:
        for p in ranks:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    p = subprocess.CompletedProcess(cmd, ranks[0].returncode, stdout, stderr)
    assert_one_line_error(p, "rank 0 of 2: a collective failed because rank 1 stopped, died or hung longer than "
                             f"train.collective_timeout_s={timeout_s} s (",
                          f"the last checkpoint is {out / 'checkpoints' / 'step_2'}; check that rank's log, then "
                          f"restart every rank with --resume auto")
    assert took < timeout_s + 30, took
    assert read_latest(out / "checkpoints") == "step_2" and not (out / ".lock").exists()
