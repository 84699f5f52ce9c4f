"""Live tensor bytes through one training step, the same way for fake and real tensors.

`MemoryTracker` is a TorchDispatchMode: every tensor an op returns has its storage counted once (a
view shares its base's storage) until the storage is freed (a weak reference's callback). The peak of
each phase is kept with its parts, split by the `classify` callback into parameters, gradients,
optimizer state, saved activations and so on. Under FakeTensorMode nothing is allocated and the counts
are the same as a real CPU step's: the shapes and dtypes are, and so is every storage's lifetime.

A fake tensor has no value, so a host read of one (`int(t)`, `t.item()`, `bool(t)`) answers as a freshly
built model and optimizer would: 0 / False for integer and bool tensors (a codec's forward counter, a
VeLoRA basis' `initialized` flag), 1.0 for float tensors (an optimizer's step count, a norm in a
clipping rule). Values only steer control flow here, never a tensor's size.
"""
from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The CUDA caching allocator hands out blocks in multiples of 512 bytes (c10/cuda/CUDACachingAllocator.cpp,
# kMinBlockSize); torch.cuda.max_memory_allocated counts the rounded blocks.
CUDA_BLOCK = 512


def cuda_rounded(nbytes: int) -> int:
    """Bytes the CUDA caching allocator would count for a storage of `nbytes`."""
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


def host_value(t: torch.Tensor):
    """The value a host read of fake tensor `t` answers (see the module docstring)."""
    return 1.0 if t.dtype.is_floating_point else (False if t.dtype == torch.bool else 0)


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of live storages; `phase(name)` starts a phase whose peak is kept.

    `classify() -> {part: set of storage ids}` names the parts of the live storages at a new peak;
    what it leaves out is reported as `temporaries`. Counts are raw bytes and CUDA-rounded bytes.

    A new peak only takes a snapshot (the live sizes and classify's sets, which must be cheap: a phase
    makes thousands of new peaks); `phase_parts` sums the last one. Each phase also keeps a trace: the
    live bytes (raw, CUDA-rounded) and storages after every allocation, with the op that made it, so
    that fit.py can extrapolate a whole step to other micro-batches."""

    def __init__(self, classify=None):
        super().__init__()
        self.live: dict[int, tuple] = {}          # id(storage) -> (weakref, bytes, cuda bytes)
        self.current = self.current_cuda = 0
        self.classify = classify
        self.phases: dict[str, dict] = {}
        self.name = ""
        self.op = None                            # the op whose outputs are being counted (None: a tensor made earlier)

    def add(self, t: torch.Tensor) -> None:
        """Count `t`'s storage if it is not counted yet (tensors made before the tracker started)."""
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = (weakref.ref(st, lambda _, k=key: self._free(k)), n, cuda_rounded(n))
        self.current += n
        self.current_cuda += cuda_rounded(n)
        rec = self.phases.get(self.name)
        if rec is not None:
            rec["trace"].append((self.current, self.current_cuda, len(self.live), self.op))
        self._check_peak()

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]
            self.current_cuda -= entry[2]

    def phase(self, name: str) -> None:
        """Start phase `name`: its peak starts at what is live now."""
        self.name = name
        self.phases[name] = {"peak_bytes": -1, "trace": [(self.current, self.current_cuda, len(self.live), None)]}
        self._check_peak()

    def _check_peak(self) -> None:
        rec = self.phases.get(self.name)
        if rec is None or self.current <= rec["peak_bytes"]:
            return
        rec.update(peak_bytes=self.current, peak_cuda_bytes=self.current_cuda, snapshot=self._snapshot())

    def _snapshot(self) -> tuple:
        return dict(self.live), (self.classify() if self.classify else {})

    def parts(self) -> dict:
        """{part: (bytes, CUDA-rounded bytes)} of what is live now."""
        return _sum_parts(*self._snapshot())

    def phase_parts(self, name: str) -> dict:
        """{part: (bytes, CUDA-rounded bytes)} at phase `name`'s peak."""
        return _sum_parts(*self.phases[name]["snapshot"])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return host_value(args[0])
        out = func(*args, **(kwargs or {}))
        self.op = func
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        self.op = None
        return out


def _sum_parts(live: dict, found: dict) -> dict:
    """Bytes by part of the `live` storages ({id: (ref, bytes, cuda bytes)}), each counted in the first
    part of `found` that names it, the rest as temporaries."""
    out, named, keys = {}, set(), set(live)
    for part, ids in found.items():
        ids = (ids & keys) - named
        named |= ids
        out[part] = (sum(live[k][1] for k in ids), sum(live[k][2] for k in ids))
    rest = keys - named
    out["temporaries"] = (sum(live[k][1] for k in rest), sum(live[k][2] for k in rest))
    return out
