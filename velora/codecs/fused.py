"""Fused encode and decode: a codec's encode/decode functions compiled by `torch.compile`.

Each codec writes its encode and decode as pure functions of tensors and Python values (quant.py,
subtoken.py); run eagerly they are the reference, and the fallback. Compiled, Inductor fuses each
into a few kernels (C++ on CPU, Triton on CUDA) that read the input once and never materialise the
fp32 copy, the noise or the unpacked codes. Integer hashing and IEEE arithmetic in the same order
make the compiled result bitwise equal to the eager one on CPU (tests/test_velora_fused.py).

`velora.fused`: "auto" compiles on CUDA only (a CPU step is dominated by its matmuls, and compiling
costs tens of seconds of C++ builds at start-up); true compiles on every device; false never.
Graphs are compiled for static shapes (symbolic sizes made Inductor's C++ index arithmetic ~40x
slower): once per function and input shape, so once per layer width in a run of fixed-length
sequences (Dynamo's recompile limit, 8 per function, falls back to the eager code, which gives the
same bits). The forward's key words are 0-d tensors, data rather than constants, so a new forward
reuses the graph. Fake tensors (the memory planner) always run the eager code.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

_COMPILED: dict = {}


def fused_on(setting, device: torch.device) -> bool:
    """Whether `setting` ("auto", True, False) fuses on `device`."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compiled(fn: Callable) -> Callable:
    """The compiled version of `fn` (one per function, shared by every codec)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def run(fn: Callable, fused: bool, *args):
    """fn(*args), compiled when `fused` and the first argument is a real tensor."""
    if fused and not is_fake(args[0]):
        return compiled(fn)(*args)
    return fn(*args)
