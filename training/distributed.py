"""Process-group setup that works the same under `deepspeed`, `torchrun` and plain `python`.

The launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python`
start has none of them, and DeepSpeed then goes looking for MPI. We fill them in for that
one-process case, pick gloo on CPU and NCCL on GPU, and keep a few helpers the loop needs.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist



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


def init_distributed(local_rank_arg: int | None = None) -> DistInfo:
    """Start the process group (gloo on CPU, NCCL on CUDA) through DeepSpeed and return who we are."""
    import deepspeed

    rank, world, local_rank = launcher_env(local_rank_arg)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shutdown() -> None:
    """Tear the process group down before exit: two-process gloo runs otherwise sometimes abort at
    interpreter exit ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
