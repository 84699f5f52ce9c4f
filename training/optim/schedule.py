"""Learning-rate schedules as torch LR schedulers (DeepSpeed steps them and checkpoints their state).

`cosine` follows GaLore's recipe: linear warmup from 0 over `warmup_ratio x max_steps` steps, then a
half cosine from the peak lr down to `min_lr_ratio x lr` at `max_steps`. `constant` keeps the peak
after the same warmup. As in GaLore, the factor is evaluated at the number of optimizer steps
already taken, so the very first update of a run with warmup uses lr 0.
"""
from __future__ import annotations

import math
from functools import partial

import torch


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    return int(warmup_ratio * max_steps)


def lr_factor(step: int, *, kind: str, max_steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer` implementing `optim.scheduler` for a run of `max_steps` steps."""
    factor = partial(lr_factor, kind=optim_cfg.scheduler, max_steps=max_steps,
                     warmup=warmup_steps(max_steps, optim_cfg.warmup_ratio), min_lr_ratio=optim_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
