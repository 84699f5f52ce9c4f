"""Process-group setup that works the same under `deepspeed`, `torchrun` and plain `python`.

The launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python`
start has none of them, and DeepSpeed then goes looking for MPI. We fill them in for that
one-process case and pick gloo on CPU and NCCL on GPU. The collectives themselves are training/collectives.py's.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass

import torch

from .collectives import is_distributed


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of a one-process run, and tests' launchers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(local_rank_arg: int | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment, filling in a one-process
    world when no launcher set it. Does not start anything."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank_arg if local_rank_arg is not None else 0)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


COMM_OP = "deepspeed_shm_comm"   # the op DeepSpeed JIT-compiles at its first start on a CPU machine


def build_comm_op() -> None:
    """Build DeepSpeed's CPU communication op into the torch extensions cache (scripts/setup.sh runs this
    once, so that no training run compiles it, ~2.5 min on a fresh venv, and none can be killed mid-build)."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def _build_lock() -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.join(_get_build_directory(COMM_OP, False), "lock")


def _warn_if_waiting_on_build_lock(done: threading.Event, after_s: float = 15.0, stale: bool | None = None) -> None:
    """torch's extension loader waits, silently and forever, while a `lock` file exists in the op's build
    directory; a build killed earlier leaves one behind. Say so, naming the file. `stale`: whether the lock
    was there before this process started loading the op (default: now); a lock this process's own build
    made (a first build takes longer than `after_s`) is no reason to warn."""
    lock = _build_lock()
    stale = os.path.exists(lock) if stale is None else stale
    if stale and not done.wait(after_s) and os.path.exists(lock):
        print(f"warning: still waiting after {after_s:.0f} s for {lock}: another process is building DeepSpeed's "
              f"{COMM_OP} op, or a build killed earlier left this file; if no other run is starting, delete it",
              file=sys.stderr, flush=True)


def init_distributed(local_rank_arg: int | None = None) -> DistInfo:
    """Start the process group (gloo on CPU, NCCL on CUDA) through DeepSpeed and return who we are."""
    import deepspeed

    rank, world, local_rank = launcher_env(local_rank_arg)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # Imported here, before the watcher thread starts: that thread importing it (setuptools, via
    # _distutils_hack) while DeepSpeed imports distutils here deadlocked on the import locks (seen).
    from torch.utils import cpp_extension  # noqa: F401
    done = threading.Event()
    stale = os.path.exists(_build_lock())    # checked before the build below can create one of its own
    threading.Thread(target=_warn_if_waiting_on_build_lock, args=(done, 15.0, stale), daemon=True).start()
    try:
        deepspeed.init_distributed(dist_backend=backend)
    finally:
        done.set()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def shutdown() -> None:
    """Tear the process group down before exit: two-process gloo runs otherwise sometimes abort at
    interpreter exit ("terminate called without an active exception")."""
    if is_distributed():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
