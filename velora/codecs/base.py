"""What every activation codec shares: the stored tensors of one input, shared by the projections
that read it, and reproducible randomness.

A codec decides what one compressed input tensor x (..., D) leaves for backward. `encode(x)` runs in
the training forward; `weight_grad(grad_y, stored)` computes grad_W = grad_yᵀ x̂ from it as one 2-D
matmul over all tokens in the compute dtype (grad_y's: bf16 in a bf16 run, with fp32 accumulation;
fp32 in an fp32 run). The projections reading one input (q/k/v, gate/up) share one `InputShare`: x̂ is
decoded once, by the first of them to run backward, and released by the last. Forward output and
grad_x never depend on the codec (see velora/function.py). State a codec needs (a basis, a forward counter) lives in buffers, so it is
checkpointed and, being derived from statistics all-reduced over ranks, identical on every rank.

Randomness is counter-based (rng.py): a hash of (seed, layer, rank, forward count, element index), so
a run and its resume draw the same numbers on any device, and a forward recomputed by activation
checkpointing draws exactly what the original forward drew (so checkpointing changes no gradient).
The forward count is a Python int mirrored into a buffer for checkpoints: counting never reads a
device tensor (no host sync, and codecs run under FakeTensorMode).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from . import fused

_MASK64 = (1 << 64) - 1


def inside_backward() -> bool:
    """True while autograd runs backward, e.g. when activation checkpointing recomputes a forward:
    state must not be updated a second time from that recomputation."""
    return torch._C._current_graph_task_id() != -1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over them): distinct inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def _signature(x: torch.Tensor) -> tuple:
    return (x.untyped_storage()._cdata, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x.device)


def world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over every rank in place (a no-op outside torch.distributed), on the process group's device
    (NCCL takes only CUDA tensors). velora/'s one collective: training/collectives.py is not importable here."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        staged = t if t.device == device else t.to(device)
        dist.all_reduce(staged)
        if staged is not t:
            t.copy_(staged)
    return t


def host_value(t: torch.Tensor, fake_default):
    """The Python value of a one-element tensor (a host read: use at load time only), or
    `fake_default` for a fake tensor, which has no value."""
    return fake_default if is_fake(t) else t.item()


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class InputShare:
    """What the projections reading one input tensor share between forward and backward: which of
    them read it (`users`), how many backwards still need x̂ (`pending`), and x̂ meanwhile."""

    __slots__ = ("users", "pending", "x_hat")

    def __init__(self, user: int):
        self.users, self.pending, self.x_hat = {user}, 0, None


@dataclass
class Encoded:
    """What one compressed input leaves for backward: tensors for `save_for_backward` (None allowed),
    plain Python values the codec needs to rebuild x̂ (a seed, a token count), and the input's share."""

    tensors: tuple
    meta: Any
    nbytes: int
    share: InputShare


class Codec(nn.Module):
    """Base class. Subclasses set `name`, `counts_forwards` (they keep a `forwards` buffer: the number
    of training forwards seen, for seeding and schedules) and implement `stored_bytes_per_token`,
    `encode` and `weight_grad`; `observe` updates state from a training batch."""

    name = ""
    counts_forwards = False

    def __init__(self, width: int, seed: int = 0, device=None):
        super().__init__()
        self.width, self.seed = width, seed
        self.fused = "auto"           # velora.fused: where encode/decode run compiled (fused.py)
        if self.counts_forwards:
            self.register_buffer("forwards", torch.zeros((), dtype=torch.int64, device=device))
        self._forwards = 0            # Python mirror of the buffer: counting never reads the device
        self._cache = None
        self.last_stored_bytes = 0

    # --- what subclasses provide -------------------------------------------------------------
    def stored_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Exact bytes stored per token when the layer computes in `dtype`."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short label for tables, e.g. `velora M=8 r=1`."""
        return self.name

    def observe(self, x: torch.Tensor, forward: int | None) -> None:
        """Update state from the training batch x before it is encoded (default: nothing)."""

    def encode(self, x: torch.Tensor, forward: int | None) -> tuple[tuple, Any]:
        """(tensors to save, meta) for input x; `forward` is this forward's index (None when the
        codec does not count forwards)."""
        raise NotImplementedError

    def decode(self, tensors: tuple, meta: Any, dtype: torch.dtype) -> torch.Tensor:
        """x̂ (tokens, D) in `dtype` from what `encode` stored."""
        raise NotImplementedError

    def weight_grad(self, grad_y: torch.Tensor, tensors: tuple, meta: Any, in_features: int,
                    share: InputShare | None = None) -> torch.Tensor:
        """grad_W (out, in_features) = grad_yᵀ x̂ in grad_y's dtype, grad_y (tokens, out); x̂ is decoded
        once per `share` (default: decoded here)."""
        return grad_y.t().matmul(self.shared_decode(tensors, meta, grad_y.dtype, share))

    def shared_decode(self, tensors: tuple, meta: Any, dtype: torch.dtype, share: InputShare | None) -> torch.Tensor:
        """`decode`, or the x̂ another projection of the share decoded; kept while backwards still need it."""
        x_hat = share.x_hat if share is not None else None
        if x_hat is None or x_hat.dtype != dtype:
            x_hat = self.decode(tensors, meta, dtype)
        if share is not None:
            share.pending -= 1
            share.x_hat = x_hat if share.pending > 0 else None
        return x_hat

    # --- shared machinery --------------------------------------------------------------------
    def run(self, fn, *args):
        """fn(*args): one of the codec's encode/decode functions, compiled where `self.fused` says."""
        return fused.run(fn, fused.fused_on(self.fused, args[0].device), *args)

    def forward_seed(self, forward: int) -> int:
        """The seed of training forward number `forward` of this codec on this rank."""
        return mix_seed(self.seed, world_rank(), forward)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.counts_forwards:
            self._forwards = host_value(self.forwards, 0)
        self._cache = None

    def _tick(self, recompute: bool) -> int | None:
        if not self.counts_forwards:
            return None
        if recompute:                        # the forward being recomputed is the last one counted
            return max(self._forwards - 1, 0)
        n = self._forwards
        self._forwards = n + 1
        self.forwards.fill_(n + 1)
        return n

    def encoded(self, x: torch.Tensor, user: nn.Module) -> Encoded:
        """What input x leaves for backward (training forwards only), updating state first.

        The result is cached (by weak reference): another projection (`user`) reading the same tensor
        gets the very same tensors, so autograd stores them once and x itself is freed. "The same
        tensor" means the same storage, view and version, not the same Python object: DeepSpeed
        ZeRO-3 hands every module a detached alias of its input. The same user calling again is a
        new forward and encodes again.
        """
        c = self._cache
        if (c is not None and c["x"] == _signature(x) and x._version == c["version"]
                and id(user) not in c["share"].users):
            c["share"].users.add(id(user))
            tensors = [r() if r is not None else None for r in c["refs"]]
            if all(t is not None for t, r in zip(tensors, c["refs"]) if r is not None):
                return Encoded(tuple(tensors), c["meta"], c["nbytes"], c["share"])
            # Autograd dropped them (activation checkpointing keeps nothing in its first forward):
            # the same input in the same forward, so encode it again with the same randomness.
            return self._encode(x, c["forward"], c["share"])
        recompute = inside_backward()
        forward = self._tick(recompute)
        if not recompute:
            self.observe(x, forward)
        return self._encode(x, forward, InputShare(id(user)))

    def _encode(self, x: torch.Tensor, forward: int | None, share: InputShare) -> Encoded:
        tensors, meta = self.encode(x, forward)
        own = {b.untyped_storage()._cdata for b in self.buffers()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors
                     if t is not None and t.untyped_storage()._cdata not in own)
        self._cache = {"x": _signature(x), "version": x._version, "forward": forward, "share": share, "meta": meta,
                       "nbytes": nbytes, "refs": [weakref.ref(t) if t is not None else None for t in tensors]}
        self.last_stored_bytes = nbytes
        return Encoded(tuple(tensors), meta, nbytes, share)
