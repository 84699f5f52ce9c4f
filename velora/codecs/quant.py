"""`sr<k>`: x itself at k bits (2, 4 or 8) with stochastic rounding (ActNN, Chen et al. 2021).

Each token's D values are cut into groups of G (the last group padded by repeating its last value,
so the padding widens no range). A group keeps its minimum lo and its step s = (max - lo) / (2^k - 1)
in fp32, and every value the integer q = floor((x - lo) / s + u), u ~ U[0, 1): E[q] = (x - lo) / s,
so x̂ = lo + q s is unbiased and grad_W = grad_yᵀ x̂ keeps every direction of the gradient. The codes
are packed 8 / k to a byte, so per token the codec stores ceil(D / G) * (G k / 8 + 8) bytes. Values
that lie on a group's grid (k = 8 and integer steps, a constant group) come back exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.errors import ConfigError

from .base import Codec
from .rng import key_tensors, uniform_at

BITS = (2, 4, 8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., B) bytes -> (..., B * 8 / bits) uint8 codes, code j of a byte in its bits j*bits..."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def sr_encode(x2: torch.Tensor, k0, k1, bits: int, group_size: int) -> tuple:
    """x2 (tokens, D) -> (packed codes (tokens, groups, G bits / 8) uint8, lo, step (tokens, groups) fp32),
    the rounding noise of element i of the padded (tokens, groups, G) layout from `uniform`'s hash i
    under key words k0, k1."""
    n, d = x2.shape
    groups = -(-d // group_size)
    xf = x2.float()
    if groups * group_size > d:
        xf = F.pad(xf.unsqueeze(1), (0, groups * group_size - d), mode="replicate").squeeze(1)
    xg = xf.view(n, groups, group_size)
    levels, per = 2 ** bits - 1, 8 // bits
    lo = xg.amin(-1, keepdim=True)
    step = (xg.amax(-1, keepdim=True) - lo) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))     # a constant group: q = 0, exact
    lanes = xg.view(n, groups, group_size // per, per)          # byte b of a group packs lanes[b, :]
    index = torch.arange(n * groups * group_size, device=x2.device).view(lanes.shape)

    def codes(v, i, lo, step):
        return ((v - lo) / step + uniform_at(i, k0, k1)).floor().clamp(0, levels).to(torch.uint8)
    if torch.compiler.is_compiling():
        # Each lane's codes computed where they are packed: one loop nest that writes only the bytes.
        lane_codes = [codes(lanes[..., j], index[..., j], lo, step) for j in range(per)]
    else:
        # Eager: each op once over every element (not once per lane); the same value per element.
        q = codes(lanes, index, lo.unsqueeze(-1), step.unsqueeze(-1))
        lane_codes = [q[..., j] for j in range(per)]
    packed = lane_codes[0]
    for j in range(1, per):
        packed = packed | (lane_codes[j] << (bits * j))
    return packed, lo.squeeze(-1), step.squeeze(-1)


def sr_decode(packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int, width: int,
              dtype: torch.dtype) -> torch.Tensor:
    """x̂ = lo + q step (tokens, width), computed in fp32 and returned in `dtype`."""
    q = unpack(packed, bits).float()
    x_hat = q * step.unsqueeze(-1) + lo.unsqueeze(-1)
    return x_hat.reshape(q.shape[0], -1)[:, :width].to(dtype)


class StochasticRounding(Codec):
    """The `sr<k>` codec. Stored per forward: packed codes (tokens, groups, G k / 8) uint8, lo and s
    (tokens, groups) fp32. Draws its rounding noise from the forward's seed."""

    counts_forwards = True

    def __init__(self, width: int, bits: int, group_size: int = 128, seed: int = 0, device=None):
        super().__init__(width, seed, device)
        if bits not in BITS:
            raise ValueError(f"stochastic rounding: bits must be one of {BITS}, got {bits}")
        if group_size < 1 or (group_size * bits) % 8:
            raise ConfigError(f"velora.group_size={group_size}: sr{bits} packs {8 // bits} codes per byte, so the "
                              f"group size must be a multiple of {8 // bits}")
        self.name, self.bits, self.group_size = f"sr{bits}", bits, group_size
        self.num_groups = math.ceil(width / group_size)

    def extra_repr(self) -> str:
        return f"width={self.width}, bits={self.bits}, group_size={self.group_size}"

    def describe(self) -> str:
        return f"{self.name} G={self.group_size}"

    def stored_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_groups * (self.group_size * self.bits // 8 + 8)

    @torch.no_grad()
    def encode(self, x, forward):
        with torch.autocast(x.device.type, enabled=False):
            stored = self.run(sr_encode, x.detach().reshape(-1, self.width),
                              *key_tensors(self.forward_seed(forward), x.device), self.bits, self.group_size)
        return stored, None

    def decode(self, tensors, meta, dtype):
        packed, lo, step = tensors
        return self.run(sr_decode, packed, lo, step, self.bits, self.width, dtype)
