"""A two-node launch, tested on one machine: two `deepspeed` launcher invocations, one per "node".

Each is `deepspeed --no_ssh --node_rank N --num_nodes 2 --num_gpus 1 --hostfile H --master_addr
127.0.0.1 --master_port P` with a hostfile naming two hosts of one slot each (127.0.0.1 and localhost:
with --no_ssh the names are only labels, never contacted). Each launcher starts its one local process
(RANK N, LOCAL_RANK 0, WORLD_SIZE 2, CUDA_VISIBLE_DEVICES=0 on the CPU accelerator) and the two meet at
MASTER_ADDR:MASTER_PORT, exactly as on two machines. The ZeRO 2 run must give the one-process losses of
conftest's `reference` run (micro 4 x 2 ranks = micro 4 x accumulation 2) and only rank 0, on node 0,
may write the run's log, TensorBoard events and console progress.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, env, free_port, losses, train_cmd

STOP = 3


@pytest.mark.slow
@pytest.mark.distributed
def test_two_launchers_as_two_nodes_match_one_process(reference, tmp_path):
    ref, _ = reference
    out, hostfile, port = tmp_path / "run", tmp_path / "hostfile", free_port()
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    procs = []
    for node in (0, 1):
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_ssh", "--node_rank", str(node),
                    "--num_nodes", "2", "--num_gpus", "1", "--hostfile", str(hostfile),
                    "--master_addr", "127.0.0.1", "--master_port", str(port)]
        cmd = train_cmd(out, "deepspeed.zero_optimization.stage=2", args=["--stop-at", str(STOP)], launcher=launcher)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))  # a group per node: launcher + rank
    deadline, logs = time.monotonic() + 600, []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    node0, node1 = logs
    assert [p.returncode for p in procs] == [0, 0], node0[-3000:] + "\n--- node 1 ---\n" + node1[-3000:]

    assert "WORLD INFO DICT: {'127.0.0.1': [0], 'localhost': [0]}" in node0
    assert "2 process(es)" in node0 and "micro 4 x accumulation 1 x 2 ranks" in node0, node0[-3000:]
    got, want = losses(out), losses(ref)
    assert sorted(got) == list(range(1, STOP + 1))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-5), (s, got, want)

    # Only rank 0 (node 0) writes: one record per step, one TensorBoard file (its process's), no progress on node 1.
    records = (out / "train_log.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in r for r in records) == STOP, records
    rank0_pid = re.search(r"\| pid (\d+)", node0).group(1)
    events = [f.name for f in (out / "tensorboard").iterdir()]
    assert len(events) == 1 and events[0].split(".")[-2] == rank0_pid, (events, rank0_pid)
    for line in node1.splitlines():
        assert not line.startswith(("model:", "step ", "saved checkpoint", "stopped after")), line
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STOP}"


def run_with(out, extra_env: dict, *sets) -> subprocess.CompletedProcess:
    from training.distributed import LAUNCHER_VARS
    clean = {k: v for k, v in env().items() if k not in LAUNCHER_VARS}
    return subprocess.run(train_cmd(out, *sets, steps=2), cwd=REPO, env=clean | extra_env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("extra, fragment", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK=1 and WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT are not"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK=3 is impossible with WORLD_SIZE=2"),
])
def test_leftover_or_impossible_launcher_variables_fail_at_once_in_one_line(tmp_path, extra, fragment):
    from conftest import assert_one_line_error
    out = tmp_path / "run"
    t0 = time.monotonic()
    p = run_with(out, extra)
    assert_one_line_error(p, fragment, "start the run through a launcher")
    assert time.monotonic() - t0 < 60 and not out.exists()


@pytest.mark.slow
def test_a_rank_whose_peers_never_come_gives_up_after_the_collective_timeout(tmp_path):
    from conftest import assert_one_line_error
    out = tmp_path / "run"
    t0 = time.monotonic()
    p = run_with(out, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}, "train.collective_timeout_s=20")
    assert_one_line_error(p, "rank 0: the other 1 process(es) of WORLD_SIZE=2 did not join at 127.0.0.1:",
                          "within train.collective_timeout_s=20 s", "or unset RANK and WORLD_SIZE")
    assert "rank 0: starting the process group of WORLD_SIZE=2 at 127.0.0.1:" in p.stderr
    assert time.monotonic() - t0 < 240 and not out.exists()    # (an op build by another process may come first)
