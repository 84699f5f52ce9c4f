"""galore-torch's GaLoreAdamW / GaLoreAdafactor under ZeRO 1-3, each matrix stepped whole by one owner.

GaLore needs a whole gradient matrix (its projector comes from the gradient's SVD), while ZeRO hands the
optimizer flat slices of the parameters (training/optim/zero_layout.py maps them back to parameter pieces).
The design: every parameter has one owner, the rank holding most of it. A parameter held whole by one
rank (under ZeRO 1/2 almost all of them: a partition boundary splits at most one parameter per group and
rank) is stepped there, on views of the flat partition and its gradient in the parameter's shape. A split one is
reassembled on its owner (its weights and gradient reduced from the pieces), stepped there, and the new
weights are broadcast so that every holder copies back its piece. The step itself is galore-torch's own
`step`, run on that one parameter with this parameter's state, so the maths (projector from the SVD every
update_proj_gap steps, moments in the projected space, scale, weight decay) is galore-torch's exactly, and
GaLore's projected moments and projector exist once, on the owner. The only exception is GaLoreAdamW's
plain group (no projection): AdamW is elementwise, so each rank steps its own pieces with their own state,
which is then partitioned like ZeRO's AdamW. galore-torch keeps its projector as a slice of the SVD factor,
which keeps the whole factor alive; we keep a copy of the slice. Optimizer state is keyed by parameter name
(or name@start for a piece), so DeepSpeed saves and restores it with the rest of the ZeRO checkpoint.

Muon in DeepSpeed 0.19 gathers whole matrices inside the ZeRO optimizer (hooks in stage_1_and_2.py for its
own MuonWithAuxAdam); that path is closed to a client optimizer, so this uses DeepSpeed's public fragment
map instead. Under ZeRO 3 every parameter is split across all ranks, so every matrix is reassembled on its
owner each step (owners alternate between ranks): correct, at the price of that traffic.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from ..collectives import broadcast_, reduce_
from .zero_layout import GroupLayout, PartitionOptimizer


class ZeroGaLore(PartitionOptimizer):
    """Run the galore-torch optimizer `inner` (built on the model's parameter groups, never stepped itself)
    on ZeRO 1-3 flat partitions; call `bind_zero(partition_layouts(engine))` before the first step."""

    def __init__(self, inner: torch.optim.Optimizer):
        from galore_torch import GaLoreAdamW

        super().__init__([dict(g) for g in inner.param_groups], inner.defaults)
        self.inner = inner
        self.elementwise_plain = isinstance(inner, GaLoreAdamW)

    def _step_partition(self, group: dict, flat: torch.Tensor, layout: GroupLayout) -> None:
        if self.elementwise_plain and "rank" not in group:
            for piece in layout.pieces:
                self._inner_step(group, piece.of(flat), piece.of(flat.grad), piece.key)
        else:
            for index in range(len(layout.params)):
                self._step_whole(group, flat, layout, index)

    def _step_whole(self, group: dict, flat: torch.Tensor, layout: GroupLayout, index: int) -> None:
        name, shape = layout.params[index]
        holders, piece = layout.holders(index), layout.piece(index)
        if len(holders) == 1:
            if piece is not None:
                self._inner_step(group, piece.of(flat).view(shape), piece.of(flat.grad).view(shape), name)
            return
        owner = layout.owner(index)
        weight, grad = (self._reassemble(t, layout, index, owner) for t in (flat, flat.grad))
        if layout.rank == owner:
            self._inner_step(group, weight, grad, name)
        broadcast_(weight, layout.global_rank(owner), layout.group)
        if piece is not None:
            piece.of(flat).copy_(weight.view(-1).narrow(0, piece.start, piece.numel))

    @staticmethod
    def _reassemble(flat: torch.Tensor, layout: GroupLayout, index: int, owner: int) -> torch.Tensor:
        """Parameter `index` whole on `owner` (a zero-filled buffer of its shape elsewhere)."""
        _, shape = layout.params[index]
        full = flat.new_zeros(shape)
        piece = layout.piece(index)
        if piece is not None:
            full.view(-1).narrow(0, piece.start, piece.numel).copy_(piece.of(flat))
        reduce_(full, layout.global_rank(owner), layout.group)
        return full

    def _inner_step(self, group: dict, weight: torch.Tensor, grad: torch.Tensor, key: str) -> None:
        """galore-torch's step for one parameter `weight` (a view or a reassembled copy) with state `key`."""
        weight.grad = grad
        self.inner.param_groups = [{**group, "params": [weight]}]
        self.inner.state = defaultdict(dict, {weight: self.state[key]})
        try:
            self.inner.step()
        finally:
            weight.grad = None
            self.inner.state = defaultdict(dict)
        _compact_projector(self.state[key].get("projector"))


def _compact_projector(projector) -> None:
    """galore-torch keeps its projector as a slice of the SVD factor (Vh[:rank] or U[:, :rank]), which keeps
    the whole factor's storage alive; a copy of the slice holds the same numbers in rank/width of the memory."""
    ortho = getattr(projector, "ortho_matrix", None)
    if torch.is_tensor(ortho) and ortho.untyped_storage().nbytes() > ortho.numel() * ortho.element_size():
        projector.ortho_matrix = ortho.clone(memory_format=torch.contiguous_format)
