"""One optimizer step: `accum` micro-batches through the DeepSpeed engine, with the checks that must
happen before the weights change."""
from __future__ import annotations

import math

import torch

from data.packing import predicted_tokens, processed_positions

from .collectives import all_reduce_values
from .distributed import DistInfo
from common.errors import NonFiniteLoss


class DataExhausted(Exception):
    """Some rank's training data ended (data.epochs > 0) before this step could be filled: every rank
    raises it at the same step, before any forward."""


class OptimizerStep:
    """Runs optimizer steps on `engine` from the iterator `batches`.

    `stop` (a crash.GracefulStop or None): whether any rank caught SIGTERM/SIGINT is summed with the
    loss, so all ranks agree on `.stop_requested` after the same step. `on_phase(name, step)` is called
    once the gradients of a step are computed and before they are applied (the run's phase hook)."""

    def __init__(self, engine, batches, accum: int, dist: DistInfo, stop=None, on_phase=None):
        self.engine, self.batches, self.accum, self.dist, self.stop = engine, batches, accum, dist, stop
        self.on_phase = on_phase or (lambda name, step: None)
        self.stop_requested = False
        # DeepSpeed reports the gradient norm from its ZeRO/bf16 optimizers only; at ZeRO 0 in fp32
        # the gradients sit in .grad (already averaged over ranks at the boundary), so we measure it.
        self.own_grad_norm = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def __call__(self, step: int) -> tuple[float, int, int, float | None, float]:
        """Run optimizer step number `step` (1-based). Returns (mean loss over all ranks and
        micro-batches, predicted tokens and processed (non-padding) positions this step over all ranks,
        gradient norm or None, the learning rate this step used). A non-finite loss raises NonFiniteLoss
        before the weights are updated. No host sync per micro-batch: the loss is summed on the device
        and read once, by the reduction that checks it; batches are copied without waiting (pinned on a GPU)."""
        engine, device = self.engine, self.dist.device
        loss_sum, tokens, positions, grad_norm = 0.0, 0, 0, None
        lr = float(engine.get_lr()[0])
        micro_batches = []
        for _ in range(self.accum):
            try:
                micro_batches.append(next(self.batches))
            except StopIteration:
                break
        # All ranks must agree, or the ones with data would wait forever in the next collective.
        if all_reduce_values([float(len(micro_batches) == self.accum)])[0] < self.dist.world_size:
            raise DataExhausted
        for micro, (input_ids, labels) in enumerate(micro_batches):
            tokens += predicted_tokens(labels)          # counted on the host batch, before it moves
            positions += processed_positions(labels)
            input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = engine(input_ids, labels=labels)
            engine.backward(loss)
            loss_sum = loss_sum + loss.detach().double()
            if micro == self.accum - 1:
                self.on_phase("step", step)
                asked = float(self.stop is not None and self.stop.requested)
                loss_sum, tokens, positions, asked = all_reduce_values([loss_sum, tokens, positions, asked])
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
        return mean, int(tokens), int(positions), grad_norm, lr
