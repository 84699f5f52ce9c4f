"""LR schedules: GaLore's warmup + cosine to min_lr_ratio, and constant, as torch schedulers."""
import math

import pytest
import torch

from training.config import OptimConfig
from training.optim.schedule import build_scheduler, lr_factor, warmup_steps


def lrs(cfg: OptimConfig, max_steps: int) -> list[float]:
    """The lr each optimizer step uses, as DeepSpeed sees it (scheduler stepped after each step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, max_steps)
    out = []
    for _ in range(max_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    got = lrs(cfg, 100)
    assert warmup_steps(100, 0.1) == 10
    assert got[:11] == pytest.approx([i / 10 for i in range(11)])   # 0 at step 1, as GaLore
    assert got[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(got[10:], got[11:]))          # monotone decay after warmup
    assert got[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, kind="cosine", max_steps=100, warmup=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(500, kind="cosine", max_steps=100, warmup=10, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_constant_keeps_peak_after_warmup():
    got = lrs(OptimConfig(lr=0.5, scheduler="constant", warmup_ratio=0.2), 10)
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_no_warmup_starts_at_peak():
    assert lrs(OptimConfig(lr=2.0, warmup_ratio=0.0), 5)[0] == pytest.approx(2.0)


def test_scheduler_state_round_trips():
    cfg = OptimConfig(lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, 50)
    for _ in range(17):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, cfg, 50)
    sched2.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
