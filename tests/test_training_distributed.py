"""training.distributed: the launcher environment is checked before anything waits on a peer, and every
process group (ours and DeepSpeed's) gets train.collective_timeout_s."""
import subprocess
import sys

import pytest

from conftest import REPO, env
from training.crash import is_peer_failure, peer_failure_message
from training.distributed import LAUNCHER_VARS, launcher_env
from common.errors import RunError


@pytest.mark.parametrize("given, fragment", [
    ({"RANK": "1"}, "RANK=1 is set in the environment but WORLD_SIZE is not (a leftover of another shell or job?)"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set in the environment but RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is impossible with WORLD_SIZE=2 (ranks are 0..1)"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1' in the environment is not an integer >= 0"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment is not an integer >= 1"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK=1 and WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT are not, so "
                                       "this process could not find its 1 peer(s)"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "MASTER_ADDR is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "LOCAL_RANK=1 is larger than RANK=0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is not a TCP port"),
])
def test_an_impossible_launcher_environment_is_one_line_naming_the_fix(monkeypatch, given, fragment):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunError) as e:
        launcher_env()
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith("start the run through a launcher (torchrun --nproc_per_node N, or deepspeed), "
                                 "which sets all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, or "
                                 "unset them for a one-process run")


@pytest.mark.parametrize("given", [{}, {"RANK": "0", "WORLD_SIZE": "1"}])
def test_a_one_process_world_is_filled_in(monkeypatch, given):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    assert launcher_env() == (0, 1, 0)
    import os
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def test_a_peer_failure_names_the_ranks_the_timeout_and_the_last_checkpoint():
    gloo = RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms "
                        "for recv operation to complete")
    assert is_peer_failure(gloo) and not is_peer_failure(RuntimeError("CUDA out of memory"))
    assert peer_failure_message(gloo, 0, 2, 15, "runs/x/checkpoints/step_4") == (
        "rank 0 of 2: a collective failed because rank 1 stopped, died or hung longer than "
        "train.collective_timeout_s=15 s (Timed out waiting 15000ms for recv operation to complete); the last "
        "checkpoint is runs/x/checkpoints/step_4; check that rank's log, then restart every rank with --resume auto")
    assert "because another rank stopped" in peer_failure_message(gloo, 3, 8, 300, "x")


@pytest.mark.slow
def test_every_process_group_gets_the_collective_timeout():
    """torch gives groups created without a timeout its own default (30 min for gloo); DeepSpeed creates its
    data-parallel group (ZeRO's gradient reductions) that way."""
    code = ("import torch, torch.distributed as dist\n"
            "from training.distributed import init_distributed\n"
            "init_distributed(None, 7)\n"
            "from deepspeed.utils import groups\n"
            "for pg in (dist.group.WORLD, groups._clone_world_group()):\n"
            "    print('timeout', pg._get_backend(torch.device('cpu')).options._timeout)\n")
    clean = {k: v for k, v in env().items() if k not in LAUNCHER_VARS}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [line for line in p.stdout.splitlines() if line.startswith("timeout")] == ["timeout 0:00:07"] * 2


def test_more_local_ranks_than_cuda_devices_is_one_line(monkeypatch):
    import torch

    from training.distributed import init_distributed
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RunError, match=r"^LOCAL_RANK=1 but this node shows 1 CUDA device\(s\) \(CUDA_VISIBLE_DEVICES=0"
                                       r"\); start at most that many processes per node$"):
        init_distributed()
