"""torch.optim.Adafactor's maths on ZeRO 1-3 flat partitions, with its second moment still factored.

Under ZeRO the optimizer sees flat fp32 tensors instead of the parameters (training/optim/zero_layout.py says
which pieces of which parameters it holds). For a matrix, Adafactor keeps a row vector and a column vector
of mean squared gradients; a piece of a row-major matrix is at most three rectangular blocks, so each rank
sums the squares of its blocks into partial row and column sums, and one all-reduce of those (rows + cols
numbers per matrix, plus the parameter's sum of squares for Adafactor's relative step size) makes them exact
on every rank holding part of the matrix. A second all-reduce of one number per parameter gives the update's
RMS for Adafactor's clipping. Every rank holding part of a matrix keeps the same row and column vectors,
not a full-size second moment; vectors (norm weights) keep an elementwise second moment for their piece.

Only matrices (2-D) and vectors are supported, which is all a LLaMA has. Before `bind_zero` (ZeRO 0) use
torch.optim.Adafactor itself: training/optim/build.py does.
"""
from __future__ import annotations

import math

import torch
from ..collectives import all_reduce_
from .zero_layout import GroupLayout, PartitionOptimizer, Piece, row_blocks


class ZeroAdafactor(PartitionOptimizer):
    """torch.optim.Adafactor (lr, beta2_decay, eps=(eps1, eps2), d, weight_decay) for ZeRO 1-3 partitions;
    call `bind_zero(partition_layouts(engine))` after deepspeed.initialize and before the first step."""

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                                  "weight_decay": weight_decay})

    def _step_partition(self, group: dict, flat: torch.Tensor, layout: GroupLayout) -> None:
        slots = _slots(layout.params)
        stats = flat.new_zeros(slots[-1])
        states = [self._state(piece, flat) for piece in layout.pieces]
        for piece, state in zip(layout.pieces, states):
            state["step"] += 1
            _add_partial_sums(stats, slots[piece.index], piece, flat, factored=len(piece.shape) == 2)
        all_reduce_(stats, layout.group)
        lr, (eps1, eps2) = float(group["lr"]), group["eps"]
        eps1 = torch.finfo(flat.dtype).eps if eps1 is None else eps1
        updates, update_sq = [], flat.new_zeros(len(layout.params))
        for piece, state in zip(layout.pieces, states):
            update = _scaled_update(piece, state, flat, stats, slots[piece.index], group["beta2_decay"], eps1)
            updates.append(update)
            update_sq[piece.index] = torch.linalg.vector_norm(update).square()
        all_reduce_(update_sq, layout.group)
        for piece, state, update in zip(layout.pieces, states, updates):
            # torch's Adafactor reads these norms with .item(); kept on the device (in float64, as Python
            # would compute them) they cost no host sync per parameter, and addcmul_ rounds as add_(alpha=) does
            n, step = math.prod(piece.shape), state["step"].item()
            alpha = (stats[slots[piece.index]].sqrt().double() / n ** 0.5).clamp(min=eps2) * min(lr, 1 / step ** 0.5)
            denom = (update_sq[piece.index].sqrt().double() / (n ** 0.5 * group["d"])).clamp(min=1.0)
            param = piece.of(flat)
            if group["weight_decay"] != 0:
                param.mul_(1 - lr * group["weight_decay"])
            param.addcmul_(update, (-alpha / denom).to(flat.dtype))

    def _state(self, piece: Piece, flat: torch.Tensor) -> dict:
        state = self.state[piece.key]
        if not state:
            if len(piece.shape) not in (1, 2):
                raise ValueError(f"{piece.name}: ZeroAdafactor supports 1-D and 2-D parameters, got {piece.shape}")
            state["step"] = torch.tensor(0.0, device="cpu")     # on the host, as in torch's Adafactor: read freely
            if len(piece.shape) == 2:
                rows, cols = piece.shape
                state["row_var"] = flat.new_zeros(rows, 1)
                state["col_var"] = flat.new_zeros(1, cols)
            else:
                state["variance"] = flat.new_zeros(piece.numel)
        return state


def _slots(params: list) -> list[int]:
    """Offsets in the statistics buffer: per parameter its sum of squares, then (matrices) its row and column
    sums of squared gradients; the last entry is the buffer's size. The same on every rank."""
    offsets, at = [], 0
    for _, shape in params:
        offsets.append(at)
        at += 1 + (shape[0] + shape[1] if len(shape) == 2 else 0)
    return offsets + [at]


def _add_partial_sums(stats: torch.Tensor, at: int, piece: Piece, flat: torch.Tensor, factored: bool) -> None:
    stats[at] += torch.linalg.vector_norm(piece.of(flat)).square()
    if not factored:
        return
    rows, cols = piece.shape
    grad = piece.of(flat.grad)
    row_sums, col_sums = stats.narrow(0, at + 1, rows), stats.narrow(0, at + 1 + rows, cols)
    for offset, row, n_rows, col, n_cols in row_blocks(piece.start, piece.numel, cols):
        block = grad.narrow(0, offset, n_rows * n_cols).view(n_rows, n_cols)
        row_sums.narrow(0, row, n_rows).add_(torch.linalg.vector_norm(block, dim=1).square_())
        col_sums.narrow(0, col, n_cols).add_(torch.linalg.vector_norm(block, dim=0).square_())


def _scaled_update(piece: Piece, state: dict, flat: torch.Tensor, stats: torch.Tensor, at: int,
                   beta2_decay: float, eps1: float) -> torch.Tensor:
    """Adafactor's update for this piece (grad / sqrt(second moment)), before the step size and clipping,
    written over the piece's gradient (not needed after the step: this keeps every piece's update without a
    partition-size buffer); updates the second-moment state."""
    weight = state["step"].item() ** beta2_decay
    grad = piece.of(flat.grad)
    if len(piece.shape) == 1:
        state["variance"].lerp_(grad * grad, weight)
        return grad.mul_(state["variance"].clamp(min=eps1 * eps1).rsqrt_())
    rows, cols = piece.shape
    state["row_var"].lerp_(stats.narrow(0, at + 1, rows).view(rows, 1) / cols, weight)
    state["col_var"].lerp_(stats.narrow(0, at + 1 + rows, cols).view(1, cols) / rows, weight)
    row_mean = state["row_var"].mean(dim=-2, keepdim=True).clamp_(min=eps1)
    for offset, row, n_rows, col, n_cols in row_blocks(piece.start, piece.numel, cols):
        var = state["row_var"].narrow(0, row, n_rows) @ state["col_var"].narrow(1, col, n_cols)
        inv_sqrt = var.div_(row_mean).clamp_(min=eps1 * eps1).rsqrt_()
        grad.narrow(0, offset, n_rows * n_cols).view(n_rows, n_cols).mul_(inv_sqrt)
    return grad
