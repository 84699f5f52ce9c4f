"""Every collective of training/ and data/ goes through here, on the process group's device.

NCCL takes only CUDA tensors and gloo is meant for host ones, so a tensor handed to a collective must live
where the backend works: `backend_device()`, the current CUDA device under NCCL, the CPU otherwise. Callers
pass tensors wherever they keep them; a tensor elsewhere (a CPU-offloaded optimizer partition under NCCL,
say) is copied there for the collective and the result copied back into it. Outside torch.distributed
(one plain process) every function here is the one-process identity. Process-group set-up and tear-down
stay in training/distributed.py; velora/ (which imports only torch) has its own one place,
velora/codecs/base.py. tests/test_training_collectives.py fails on any other module calling torch.distributed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    """This process's rank in `group` (the world by default); 0 outside torch.distributed."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group=None) -> int:
    """The number of ranks in `group` (the world by default); 1 outside torch.distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def global_rank(group, group_rank: int) -> int:
    """The world rank of rank `group_rank` of `group` (None: the world)."""
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def backend_device(group=None) -> torch.device:
    """Where `group`'s backend takes tensors: the current CUDA device under NCCL, the CPU otherwise."""
    if is_distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _staged(t: torch.Tensor, group) -> torch.Tensor:
    """`t` itself when the backend can take it, else a copy on the backend's device."""
    device = backend_device(group)
    return t if t.device == device and t.is_contiguous() else t.to(device).contiguous()


def _in_place(op, t: torch.Tensor, group, *args) -> torch.Tensor:
    """Run the in-place collective `op(tensor, *args, group=group)` on `t`, staged where the backend works."""
    staged = _staged(t, group)
    op(staged, *args, group=group)
    if staged is not t:
        t.copy_(staged)
    return t


def barrier() -> None:
    """Wait for every rank (nothing outside torch.distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_(t: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """Reduce `t` in place over `group` with `op` ("sum" or "max"); returns `t`."""
    if world_size(group) > 1:
        _in_place(dist.all_reduce, t, group, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def broadcast_(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Overwrite `t` with world rank `src`'s `t`, on every rank of `group`; returns `t`."""
    if world_size(group) > 1:
        _in_place(dist.broadcast, t, group, src)
    return t


def reduce_(t: torch.Tensor, dst: int, group=None) -> torch.Tensor:
    """Sum `t` over `group` into world rank `dst`'s `t` (the others' `t` is left undefined); returns `t`."""
    if world_size(group) > 1:
        _in_place(dist.reduce, t, group, dst)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on all), in rank order, on `t`'s device."""
    if world_size(group) == 1:
        return [t.clone()]
    staged = _staged(t, group)
    out = [torch.empty_like(staged) for _ in range(world_size(group))]
    dist.all_gather(out, staged, group=group)
    return [o.to(t.device) for o in out]


def all_reduce_values(values: list, op: str = "sum") -> list[float]:
    """Reduce a few numbers (Python numbers, or 0-d tensors on any device, which are not synced first) over
    all ranks in float64, so that counts stay exact, with one collective; returns floats on every rank."""
    if world_size() == 1:
        return [float(v) for v in values]
    device = backend_device()
    t = torch.tensor([0.0 if torch.is_tensor(v) else float(v) for v in values], dtype=torch.float64).to(device)
    for i, v in enumerate(values):
        if torch.is_tensor(v):
            t[i] = v.detach().to(device)
    return all_reduce_(t, op=op).tolist()
