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
from datetime import timedelta

import torch
import torch.distributed as dist

from .collectives import is_distributed
from common.errors import RunError


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


def spawn_local(worker, args: tuple, nprocs: int) -> None:
    """Run `worker(rank, *args)` on `nprocs` local processes (tests and benchmarks); raises if any fails.

    Each process that returns leaves through os._exit: a gloo process group that DeepSpeed still holds after
    destroy_process_group is torn down during interpreter finalization, where its worker threads can abort the
    finished process with SIGABRT (seen once in CI; pytorch/pytorch#179291 describes the mechanism)."""
    import torch.multiprocessing as mp

    mp.spawn(_run_then_exit, args=(worker, args), nprocs=nprocs, join=True)


def _run_then_exit(rank: int, worker, args: tuple) -> None:
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_FIX = ("start the run through a launcher (torchrun --nproc_per_node N, or deepspeed), which sets all of "
              "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, or unset them for a one-process run")


def _env_int(name: str, lowest: int) -> int:
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < lowest:
        raise RunError(f"{name}={raw!r} in the environment is not an integer >= {lowest}; {LAUNCH_FIX}")
    return value


def check_launcher_env() -> None:
    """Refuse, in one line and before anything waits on a peer, a launcher environment that cannot start:
    RANK without WORLD_SIZE (or the reverse: leftovers of an earlier shell), a rank outside the world,
    a multi-process world without MASTER_ADDR / MASTER_PORT (it would wait for peers that never come)."""
    given = [v for v in ("RANK", "WORLD_SIZE") if v in os.environ]
    if len(given) == 1:
        missing = ({"RANK", "WORLD_SIZE"} - set(given)).pop()
        raise RunError(f"{given[0]}={os.environ[given[0]]} is set in the environment but {missing} is not "
                       f"(a leftover of another shell or job?); {LAUNCH_FIX}")
    if not given:
        return
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if rank >= world:
        raise RunError(f"RANK={rank} is impossible with WORLD_SIZE={world} (ranks are 0..{world - 1}); {LAUNCH_FIX}")
    if "LOCAL_RANK" in os.environ and _env_int("LOCAL_RANK", 0) > rank:
        raise RunError(f"LOCAL_RANK={os.environ['LOCAL_RANK']} is larger than RANK={rank} (a process's rank on its "
                       f"node cannot exceed its rank in the world); {LAUNCH_FIX}")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if world > 1 and missing:
        raise RunError(f"RANK={rank} and WORLD_SIZE={world} are set but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not, so this process could not find its "
                       f"{world - 1} peer(s) and would wait for them; {LAUNCH_FIX}")
    if "MASTER_PORT" in os.environ and not 0 < _env_int("MASTER_PORT", 1) < 65536:
        raise RunError(f"MASTER_PORT={os.environ['MASTER_PORT']} is not a TCP port (1-65535); {LAUNCH_FIX}")


def launcher_env(local_rank_arg: int | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (checked by `check_launcher_env`),
    filling in a one-process world when no launcher set it. Does not start anything."""
    check_launcher_env()
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    if int(os.environ["WORLD_SIZE"]) == 1:
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


def _warn_if_waiting_for_peers(done: threading.Event, rank: int, world: int, timeout_s: float,
                               after_s: float = 15.0) -> None:
    """The rendezvous waits silently for every rank to join; say who waits for whom, and until when."""
    if world > 1 and not done.wait(after_s):
        print(f"rank {rank}: starting the process group of WORLD_SIZE={world} at {os.environ.get('MASTER_ADDR')}:"
              f"{os.environ.get('MASTER_PORT')} has taken {after_s:.0f} s; it waits for the other {world - 1} "
              f"process(es) for at most train.collective_timeout_s={timeout_s:g} s. If no launcher started this "
              f"process, unset RANK and WORLD_SIZE", file=sys.stderr, flush=True)


def set_collective_timeout(timeout_s: float) -> timedelta:
    """Make `timeout_s` the timeout of every process group created from now on: the default group (passed to
    init_process_group) and the groups DeepSpeed creates later without a timeout (its data-parallel clone of
    the world, over which ZeRO reduces gradients), which torch would otherwise give its own default (30 min
    for gloo, 10 min for NCCL)."""
    from torch.distributed import distributed_c10d as c10d
    timeout = timedelta(seconds=timeout_s)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)
    return timeout


def init_distributed(local_rank_arg: int | None = None, timeout_s: float = 300.0) -> DistInfo:
    """Start the process group (gloo on CPU, NCCL on CUDA) through DeepSpeed and return who we are.
    Every collective of the run fails after `timeout_s` seconds without its peers (train.collective_timeout_s)."""
    import deepspeed

    rank, world, local_rank = launcher_env(local_rank_arg)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK={local_rank} but this node shows {torch.cuda.device_count()} CUDA device(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                           f"that many processes per node")
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
    threading.Thread(target=_warn_if_waiting_for_peers, args=(done, rank, world, timeout_s), daemon=True).start()
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=set_collective_timeout(timeout_s))
    except dist.DistError as e:    # the rendezvous timed out: a peer never came
        raise RunError(f"rank {rank}: the other {world - 1} process(es) of WORLD_SIZE={world} did not join at "
                       f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                       f"train.collective_timeout_s={timeout_s:g} s ({str(e).splitlines()[0][:200]}); start every "
                       f"rank with the same MASTER_ADDR/MASTER_PORT, or unset RANK and WORLD_SIZE for a "
                       f"one-process run") from None
    finally:
        done.set()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def shutdown() -> None:
    """Tear the process group down before exit: two-process gloo runs otherwise sometimes abort at
    interpreter exit ("terminate called without an active exception")."""
    if is_distributed():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
