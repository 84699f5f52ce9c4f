"""Only healthy states are saved: finiteness checks of the weights and optimizer state, and the record of
the newest checkpoint verified healthy.

A checkpoint is *verified healthy* when its weights and optimizer state were finite when it was saved and
a loss computed from its weights (the next training step's, or the evaluation at its step) was finite.
Only then does `checkpoints/healthy` name it. A finite loss whose update blows the weights up therefore
never makes a checkpoint "good": the run stops at the next step's non-finite loss, sets the unverified
checkpoint aside as `step_N.diverged/` (kept, never read by `--resume auto`) and points `latest` back at
the verified one; `prune` never deletes the checkpoint `healthy` names.

Loss-spike policy: a non-finite loss stops the run before its update is applied; a finite spike is trained
on (no step is skipped, as in GaLore's and the usual reference trainers). A divergence that leaves the
loss finite (weights scaled up until the model predicts uniformly) is not detected here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..collectives import all_reduce_values
from .files import atomic_write_text, fsync_dir
from .layout import DIVERGED_SUFFIX, HEALTHY, LATEST


def _tensors(obj, seen: set) -> list[torch.Tensor]:
    """The floating-point tensors inside nested dicts / lists / tuples (other objects are skipped)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and id(obj) not in seen:
            seen.add(id(obj))
            return [obj]
        return []
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item, seen)]
    return []


def local_state_tensors(module: torch.nn.Module, optimizer) -> list[torch.Tensor]:
    """This rank's share of the weights (ZeRO-3: the local partitions), buffers, the optimizer's master
    weights and its state tensors: everything a checkpoint of this rank holds."""
    seen: set = set()
    params = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    found = _tensors(params, seen) + _tensors(list(module.buffers()), seen)
    walked = set()
    while optimizer is not None and id(optimizer) not in walked:   # DeepSpeed's wrappers hold the optimizer
        walked.add(id(optimizer))
        found += _tensors([g.get("params", []) for g in getattr(optimizer, "param_groups", [])], seen)
        found += _tensors(list(getattr(optimizer, "state", {}).values()), seen)
        optimizer = getattr(optimizer, "optimizer", None)
    return found


def nonfinite_tensors(module: torch.nn.Module, optimizer) -> int:
    """How many weight / optimizer-state tensors hold an inf or NaN, summed over all ranks (a collective
    call: every rank must make it)."""
    tensors = local_state_tensors(module, optimizer)
    bad = sum(int(not bool(torch.isfinite(t).all())) for t in tensors)
    return int(all_reduce_values([bad])[0])


def read_healthy(ckpt_root: Path) -> str | None:
    """The tag (`step_N`) `checkpoints/healthy` names when that checkpoint still exists, else None."""
    f = Path(ckpt_root) / HEALTHY
    try:
        tag = f.read_text().strip() if f.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return None
    return tag if re.fullmatch(r"step_\d+", tag) and (Path(ckpt_root) / tag).is_dir() else None


def mark_healthy(ckpt_root: Path, tag: str) -> None:
    """Record `tag` as the newest checkpoint verified healthy (rank 0, atomically)."""
    atomic_write_text(Path(ckpt_root) / HEALTHY, tag)


def set_aside(ckpt_root: Path, tag: str, healthy: str | None) -> str:
    """After a divergence (rank 0): rename the unverified checkpoint `tag` to `tag.diverged/` (kept for
    inspection, never read by `--resume auto`) and point `latest` at `healthy`; without a verified one,
    `latest` is removed when it named `tag` (`--resume auto` then takes the newest remaining checkpoint).
    Returns the new name."""
    ckpt_root = Path(ckpt_root)
    src = ckpt_root / tag
    target = src.with_name(tag + DIVERGED_SUFFIX)
    if target.exists():          # an earlier divergence at the same step: keep both
        target = src.with_name(f"{tag}{DIVERGED_SUFFIX}.{os.getpid()}")
    if src.is_dir():
        src.rename(target)
    latest = ckpt_root / LATEST
    if healthy:
        atomic_write_text(latest, healthy)
    elif latest.is_file() and latest.read_text().strip() == tag:
        latest.unlink()
    fsync_dir(ckpt_root)
    return target.name


def check_finite(tensors, where: str) -> None:
    """Refuse weights holding inf or NaN: a one-line CheckpointError naming `where` and the first such tensor."""
    from common.errors import CheckpointError
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} weight tensor(s) hold inf or NaN (e.g. {bad[0]}); the weights "
                              f"diverged: use an earlier checkpoint, or pass --allow-nonfinite to go on anyway")
