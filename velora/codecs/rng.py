"""Counter-based random numbers: a hash of (key, element index) in integer tensor ops.

Element i of a stream with the 63-bit key k (base.py: `mix_seed(seed, rank, forward)`, the seed
itself mixed from the run's seed and the layer) is `hash32(i, k)`: two rounds of a 32-bit
xorshift-multiply mixer keyed by the key's low and high words. Every value is a 32-bit integer held
in int64 and masked after each multiply; the multipliers are below 2**31, so no product needs more
than 63 bits and nothing relies on signed overflow. The same integer ops give the same bits on CPU,
on CUDA and in compiled kernels (Inductor's C++ and Triton), and the numbers depend only on the key
and the index: a resumed run, a forward recomputed by activation checkpointing and another device
draw exactly the same ones. Nothing here touches torch's global generators.

Uniforms use the top 24 bits (exact in fp32); signs the top bit; normals are Box-Muller on two
uniforms (log and cos round differently on each device, so normals agree across devices to a few
ulps, not bitwise).
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 (so a 32-bit value times one fits 63 bits), with well-spread bits.
_MUL = (0x7FEB352D, 0x5BD1E995)


def key_words(key: int) -> tuple[int, int]:
    """The (low, high) 32-bit words of a non-negative 63-bit key."""
    return key & MASK32, (key >> 32) & MASK32


def key_tensors(key: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`key_words` as two 0-d int64 tensors on `device`, the form the codecs pass: a compiled graph
    then takes a new key as data (no recompilation), and creating them is a fill, not a host copy."""
    return tuple(torch.full((), w, dtype=torch.int64, device=device) for w in key_words(key))


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit values (held in int64)."""
    h = h ^ (h >> 16)
    h = (h * _MUL[0]) & MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL[1]) & MASK32
    return h ^ (h >> 16)


def hash32(index: torch.Tensor, k0, k1) -> torch.Tensor:
    """32-bit hashes (int64 tensor) of int64 element indices (non-negative) under key words k0, k1
    (Python ints or 0-d int64 tensors)."""
    h = _mix((index & MASK32) ^ k0)
    return _mix(h ^ (index >> 32) ^ k1)


def _indices(n: int, device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device)


def uniform_at(index: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """fp32 uniforms in [0, 1) on a grid of 2**-24, one per element index."""
    return (hash32(index, k0, k1) >> 8).float() * 2.0 ** -24



def signs(shape, k0: int, k1: int, device) -> torch.Tensor:
    """fp32 ±1 with probability 1/2 each (the top bit of each hash)."""
    n = math.prod(shape)
    return (1 - 2 * (hash32(_indices(n, device), k0, k1) >> 31)).float().view(shape)


@torch.compiler.disable
def normal(shape, k0: int, k1: int, device) -> torch.Tensor:
    """fp32 standard normals: Box-Muller on the uniforms of indices 2i and 2i + 1 (the cosine half).
    Always eager: compiled log and cos may round differently from ATen's, and the fused path must
    equal the eager one bitwise."""
    n = math.prod(shape)
    h = hash32(_indices(2 * n, device), k0, k1).view(n, 2)
    u1 = ((h[:, 0] >> 8) + 1).float() * 2.0 ** -24             # (0, 1]: log stays finite
    u2 = (h[:, 1] >> 8).float() * 2.0 ** -24
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)).view(shape)
