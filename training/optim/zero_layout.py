"""Shape recovery under ZeRO 1, 2 and 3: which (parameter, element range) pieces a rank's flat fp32 partition holds.

ZeRO replaces each parameter group of the client optimizer by flat fp32 tensors, this rank's share of the
group's parameters laid end to end, and the optimizer steps those.

ZeRO 1/2 cut the group's flattened parameters into one contiguous range per rank. DeepSpeed keeps the map
back to the parameters for its universal checkpoints, and we read it rather than recompute it: after
`deepspeed.initialize`, every model parameter `lp` of group i has `lp._hp_mapping`, a `tensor_fragment` that
is None when this rank holds none of `lp`, whose `lp_fragment_address` (start, numel) is the range of the
flattened parameter held here and whose `hp_fragment_address` (start, numel) is where that range sits in the
flat partition; the ZeRO optimizer lists group i's parameters, in the same order on every rank, in
`bit16_groups[i]` and its flat partition in `single_partition_of_fp32_groups[i]`.

ZeRO 3 cuts every parameter into world-size equal slices (`param.ds_tensor`, the last one zero-padded;
`ds_numel`, `ds_shape` describe the whole), and steps one sub-group at a time: `fp32_partitioned_groups_flat[k]`
is the slices of the parameters `fp16_groups[k]`, in order. Every matrix is then split across all ranks.

One all-gather at bind time tells every rank how much of each parameter every other rank holds, so they
all agree on who holds what and on an owner per parameter (see GroupLayout.owner); it also checks that
the pieces tile every parameter. The DeepSpeed names used here are in `PINNED`;
tests/test_training_optim_zero.py checks that they exist and mean what is said above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..collectives import all_gather, backend_device, global_rank, rank, world_size

PINNED = {"engine.optimizer": ("bit16_groups", "single_partition_of_fp32_groups", "real_dp_process_group"),
          "engine.optimizer (ZeRO 3)": ("fp16_groups", "fp32_partitioned_groups_flat", "dp_process_group"),
          "parameter": ("_hp_mapping",), "parameter (ZeRO 3)": ("ds_tensor", "ds_numel", "ds_shape"),
          "_hp_mapping": ("lp_fragment_address", "hp_fragment_address"),
          "fragment_address": ("start", "numel")}


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of the flattened parameter `name`, at `flat_start` of the partition."""

    name: str
    shape: tuple
    index: int          # the parameter's position in its group, the same on every rank
    start: int
    flat_start: int
    numel: int

    @property
    def key(self) -> str:
        """A name for this piece's optimizer state (strings survive torch's optimizer state_dict as keys)."""
        return f"{self.name}@{self.start}"

    @property
    def whole(self) -> bool:
        return self.numel == math.prod(self.shape)

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """This piece of the flat partition (or of its gradient), as a 1-D view."""
        return flat.narrow(0, self.flat_start, self.numel)


@dataclass
class GroupLayout:
    """One parameter group under ZeRO: every parameter's name and shape, this rank's pieces and, per
    parameter, the numbers of elements each rank of `group` holds (`held[rank][index]`)."""

    params: list
    pieces: list
    held: list
    group: object
    rank: int

    def piece(self, index: int) -> Piece | None:
        """This rank's piece of parameter `index`, or None."""
        return next((p for p in self.pieces if p.index == index), None)

    def holders(self, index: int) -> list[int]:
        return [r for r, counts in enumerate(self.held) if counts[index] > 0]

    def owner(self, index: int) -> int:
        """The rank (in `group`) that holds most of parameter `index`; on a tie (ZeRO 3 cuts every parameter
        into equal slices) the tied ranks take turns by parameter index, spreading the owners."""
        counts = [counts[index] for counts in self.held]
        tied = [r for r, c in enumerate(counts) if c == max(counts)]
        return tied[index % len(tied)]

    def global_rank(self, group_rank: int) -> int:
        return global_rank(self.group, group_rank)


def partition_layouts(engine) -> dict[int, GroupLayout]:
    """The layout of every flat partition that `engine`'s ZeRO 1, 2 or 3 optimizer steps, keyed by id() of
    that flat tensor (the one the client optimizer finds in its param_groups)."""
    stage, zero = engine.zero_optimization_stage(), engine.optimizer
    if stage in (1, 2):
        groups = [(zero.single_partition_of_fp32_groups[i], zero.real_dp_process_group[i], params,
                   _fragment_pieces(params)) for i, params in enumerate(zero.bit16_groups)]
    elif stage == 3:
        here, world = rank(zero.dp_process_group), world_size(zero.dp_process_group)
        groups = [(flat, zero.dp_process_group, params, _stage3_pieces(params, here, world, flat))
                  for flat, params in zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups)]
    else:
        raise ValueError(f"partition layouts exist under ZeRO 1, 2 and 3, not stage {stage}")
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {id(flat): _layout(params, pieces, group, names) for flat, group, params, pieces in groups}


def _fragment_pieces(params) -> list[tuple]:
    """ZeRO 1/2: (index, start, flat start, numel) of this rank's pieces, from DeepSpeed's fragment map."""
    pieces = []
    for index, lp in enumerate(params):
        mapping = getattr(lp, "_hp_mapping", None)
        if mapping is not None:
            pieces.append((index, mapping.lp_fragment_address.start, mapping.hp_fragment_address.start,
                           mapping.lp_fragment_address.numel))
    return pieces


def _stage3_pieces(params, rank: int, world: int, flat: torch.Tensor) -> list[tuple]:
    """ZeRO 3: every parameter is cut into world-size equal slices (the last one zero-padded); this rank's
    slice `ds_tensor` starts at rank x its size, and the sub-group's flat partition is those slices in order."""
    pieces, at = [], 0
    for index, p in enumerate(params):
        size = p.ds_tensor.numel()
        if size != -(-p.ds_numel // world):     # hierarchical (hpZ, MiCS) partitioning slices otherwise
            raise RuntimeError(f"ZeRO 3 slice of {size} elements for a parameter of {p.ds_numel} over {world} "
                               f"ranks: only plain ZeRO 3 partitioning is supported by training/optim/zero_layout.py")
        held = max(0, min(size, p.ds_numel - rank * size))
        if held:
            pieces.append((index, rank * size, at, held))
        at += size
    if at != flat.numel():
        raise RuntimeError(f"ZeRO 3's flat partition has {flat.numel()} elements, its parameters' slices {at}: this "
                           f"DeepSpeed is not the one training/optim/zero_layout.py was written for")
    return pieces


def _layout(params, pieces: list[tuple], group, names: dict) -> GroupLayout:
    shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in params]
    mine = [0] * len(params)
    for index, _, _, numel in pieces:
        mine[index] = numel
    # made on the backend's device (NCCL refuses host tensors), read back on the host
    gathered = all_gather(torch.tensor(mine, dtype=torch.int64, device=backend_device(group)), group)
    held = [h.tolist() for h in gathered]
    torn = [names[id(p)] for i, p in enumerate(params) if sum(h[i] for h in held) != math.prod(shapes[i])]
    if torn:
        raise RuntimeError(f"the ranks' pieces do not tile {torn[0]}: this DeepSpeed is not the one "
                           f"training/optim/zero_layout.py was written for")
    return GroupLayout([(names[id(p)], shape) for p, shape in zip(params, shapes)],
                       [Piece(names[id(params[i])], shapes[i], i, start, flat_start, numel)
                        for i, start, flat_start, numel in pieces],
                       held, group, rank(group))


class PartitionOptimizer(torch.optim.Optimizer):
    """Base of the client optimizers for ZeRO 1-3: `bind_zero(partition_layouts(engine))` after
    deepspeed.initialize, then each step calls `_step_partition(group, flat, layout)` per flat partition."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self.layouts: dict[int, GroupLayout] = {}

    def bind_zero(self, layouts: dict[int, GroupLayout]) -> None:
        """Take the ZeRO layout of every flat partition in param_groups."""
        missing = [i for i, g in enumerate(self.param_groups) for p in g["params"] if id(p) not in layouts]
        if missing:
            raise ValueError(f"no ZeRO layout for the flat partition of parameter group(s) {missing}")
        self.layouts = layouts

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for flat in group["params"]:
                self._step_partition(group, flat, self.layouts[id(flat)])
        return loss

    def _step_partition(self, group: dict, flat: torch.Tensor, layout: GroupLayout) -> None:
        raise NotImplementedError


def row_blocks(start: int, numel: int, cols: int):
    """Split elements [start, start + numel) of a row-major matrix with `cols` columns into at most three
    rectangular blocks (a partial first row, whole rows, a partial last row). Yields (offset in the range,
    first row, rows, first column, columns)."""
    pos, end = start, start + numel
    while pos < end:
        row, col = divmod(pos, cols)
        if col or end - pos < cols:
            n = min(cols - col, end - pos)
            yield pos - start, row, 1, col, n
            pos += n
        else:
            rows = (end - pos) // cols
            yield pos - start, row, rows, 0, cols
            pos += rows * cols
