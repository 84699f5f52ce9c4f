"""The pieces of a training run that sit between the config and the loop in train_c4.py:
output-directory checks, seeding, the model + DeepSpeed engine, and one optimizer step.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from model import LlamaForCausalLM

from .checkpoint import read_latest, step_dirs
from .config import ConfigError, RunConfig
from .crash import pause_point
from .distributed import DistInfo, all_reduce_sum
from .optim import build_optimizer, zero_stage
from .schedule import build_scheduler


class RunError(RuntimeError):
    """A run that cannot start or continue (unwritable output, diverged loss): one-line message."""


class NonFiniteLoss(RunError):
    """The loss became inf/nan; raised before the optimizer step that would apply it."""


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights everywhere (DeepSpeed also broadcasts them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(output_dir: str, resume: str | None) -> None:
    """Fail before anything starts when the output directory cannot be written, or when it already
    holds a run that this command would silently overwrite."""
    path = Path(output_dir).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a directory")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise RunError(f"train.output_dir={output_dir}: not writable ({e.strerror or e}); choose another with "
                       f"--set train.output_dir=DIR") from None
    ckpt_root = path / "checkpoints"
    if resume is None and (read_latest(ckpt_root) or step_dirs(ckpt_root)):
        raise RunError(f"train.output_dir={output_dir} already holds checkpoints (latest: "
                       f"{read_latest(ckpt_root) or step_dirs(ckpt_root)[-1].name}); continue that run with "
                       f"--resume auto, or start a new one with --set train.output_dir=NEW_DIR")


def check_model_data(cfg: RunConfig) -> None:
    if cfg.data.seq_len > cfg.model.max_sequence_length:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_sequence_length="
                          f"{cfg.model.max_sequence_length}; lower data.seq_len or raise the model's")


def build_model(cfg: RunConfig):
    """The LLaMA model with VeLoRA applied when enabled; returns (model, VeLoRA summary or None)."""
    model = LlamaForCausalLM(cfg.model)
    if not cfg.velora.enabled:
        return model, None
    from velora import apply_velora

    return apply_velora(model, cfg.velora)


def build_engine(model: torch.nn.Module, cfg: RunConfig):
    """deepspeed.initialize with our optimizer (or DeepSpeed's) and LR schedule; returns (engine, notes)."""
    import deepspeed

    optimizer, ds, notes = build_optimizer(model, cfg)
    scheduler = partial(build_scheduler, optim_cfg=cfg.optim, max_steps=cfg.train.max_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds,
                                      model_parameters=model.parameters() if optimizer is None else None)
    return engine, notes


class Trainer:
    """One optimizer step = `accum` micro-batches through the DeepSpeed engine.

    `stop` (a crash.GracefulStop or None): whether any rank caught SIGTERM/SIGINT is summed with
    the loss, so all ranks agree on `.stop_requested` after the same step."""

    def __init__(self, engine, batches, accum: int, dist: DistInfo, stop=None):
        self.engine, self.batches, self.accum, self.dist, self.stop = engine, batches, accum, dist, stop
        self.stop_requested = False
        # DeepSpeed reports the gradient norm from its ZeRO/bf16 optimizers only; at ZeRO 0 in fp32
        # the gradients sit in .grad (already averaged over ranks at the boundary), so we measure it.
        self.own_grad_norm = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def step(self, step: int) -> tuple[float, int, float | None, float]:
        """Run optimizer step number `step` (1-based). Returns (mean loss over all ranks and
        micro-batches, tokens with a label this step over all ranks, gradient norm or None, the
        learning rate this step used).

        A non-finite loss raises NonFiniteLoss before the weights are updated."""
        engine, device = self.engine, self.dist.device
        loss_sum, tokens, grad_norm = 0.0, 0, None
        lr = float(engine.get_lr()[0])
        for micro in range(self.accum):
            input_ids, labels = next(self.batches)
            input_ids, labels = input_ids.to(device), labels.to(device)
            loss = engine(input_ids, labels=labels)
            engine.backward(loss)
            loss_sum += float(loss.detach())
            tokens += int((labels != -100).sum())
            if micro == self.accum - 1:
                pause_point("step", step)
                asked = float(self.stop is not None and self.stop.requested)
                loss_sum, tokens, asked = all_reduce_sum([loss_sum, tokens, asked], device)
                self.stop_requested = asked > 0
                mean = loss_sum / (self.accum * self.dist.world_size)
                if not math.isfinite(mean):
                    raise NonFiniteLoss(f"non-finite loss ({mean}) at step {step}: stopped before updating "
                                        f"the weights")
                if self.own_grad_norm:
                    grad_norm = self._grad_norm()
            engine.step()
        if grad_norm is None and (norm := engine.get_global_grad_norm()) is not None:
            grad_norm = float(norm)
        return mean, int(tokens), grad_norm, lr


def output_paths(cfg: RunConfig) -> tuple[Path, Path]:
    run_dir = Path(cfg.train.output_dir)
    return run_dir, run_dir / "checkpoints"


def describe(cfg: RunConfig, model: torch.nn.Module, dist: DistInfo, batch: tuple) -> str:
    g, m, a, note = batch
    n = sum(p.numel() for p in model.parameters())
    return (f"model: {n / 1e6:.2f}M parameters, {cfg.model.num_hidden_layers} layers, hidden {cfg.model.hidden_size}"
            f" | {dist.world_size} process(es) on {dist.device.type} ({dist.backend}) | ZeRO "
            f"{zero_stage(cfg.deepspeed)}, {'bf16' if cfg.deepspeed.get('bf16', {}).get('enabled') else 'fp32'}"
            f" | global batch {g} = micro {m} x accumulation {a} x {dist.world_size} ranks"
            + (f" ({note})" if note else "") + f" | pid {os.getpid()}")
