"""`pca`: principal directions of the whole input, plus an unbiased random sketch of the rest
(the idea of PRAC, Li et al. 2026; ESPACE, Sakr & Khailany 2024, keeps the principal part only).

Sub-tokens discard the low-rank structure activations have: with the same K numbers per token, the
top-K principal directions of the D-wide input keep far more of its energy than K sub-token
coefficients (ACTIVATION-COMPRESSION.md). This codec keeps, per token, the coefficients c = Uᵀ x on
the p leading eigenvectors U (D x p) of the input's second moment, and sketches the residual
x - U c with an independent random sign vector per token and sub-token of size 2M (RandomVectors).
x̂ = U c + sketch⁻¹ is unbiased. U is recomputed from one batch every `refresh_every` training
forwards, from statistics summed over ranks, so every rank holds the same U (a buffer, checkpointed).
With the default budget (p = ceil(r K / 2), residual sub-tokens of 2M) it stores about as many
numbers per token as `velora` with the same M and r.
"""
from __future__ import annotations

import math

import torch

from common.errors import ConfigError, check_positive

from .base import Codec, all_reduce_, element_size
from .subtoken import RandomVectors, compute_dtype, reconstruct, sketch


def pca_encode(x2: torch.Tensor, basis: torch.Tensor, k0: int, k1: int, kind: str, m: int, r: int,
               dtype: torch.dtype) -> tuple:
    """(c, z) in `dtype`: x2's coefficients on the basis and the sketch of the rest."""
    x2, basis = x2.float(), basis.float()        # a bf16 model's buffers are bf16 (DeepSpeed casts them)
    c = x2.matmul(basis)
    return c.to(dtype), sketch(x2 - c.matmul(basis.t()), k0, k1, kind, m, r).to(dtype)


def pca_decode(c: torch.Tensor, z: torch.Tensor, basis: torch.Tensor, k0: int, k1: int, kind: str, m: int, r: int,
               width: int, dtype: torch.dtype) -> torch.Tensor:
    """x̂ = U c + the sketch's reconstruction, in `dtype`."""
    return (reconstruct(z, k0, k1, kind, m, r, width) + c.float().matmul(basis.float().t())).to(dtype)


class PrincipalPlusRandom(Codec):
    """The `pca` codec. Buffers: `basis` (D x p, the principal directions) and `forwards`. Stored per
    forward: c (tokens, p) and z (tokens, residual coefficients), both in the compute dtype; U is
    saved by reference (a buffer: autograd refuses a backward after it changed)."""

    name = "pca"
    counts_forwards = True

    def __init__(self, width: int, sub_token_size: int, rank: int = 1, refresh_every: int = 200, seed: int = 0,
                 device=None):
        super().__init__(width, seed, device)
        for key, value in (("sub_token_size", sub_token_size), ("rank", rank), ("refresh_every", refresh_every)):
            check_positive(f"velora.{key}", value, integer=True)
        self.sub_token_size, self.rank, self.refresh_every = sub_token_size, rank, refresh_every
        self.principal = min(width - 1, math.ceil(rank * math.ceil(width / sub_token_size) / 2))
        if self.principal < 1:
            raise ConfigError(f"velora.codec=pca: a {width}-wide input is too small for principal directions; "
                              f"give it another codec (velora.codec_overrides)")
        residual_m = min(2 * sub_token_size, width)
        self._residual = RandomVectors(width, residual_m, min(rank, residual_m), "rademacher")
        self.register_buffer("basis", torch.zeros(width, self.principal, device=device))

    def extra_repr(self) -> str:
        return (f"width={self.width}, principal={self.principal}, residual sub_token_size="
                f"{self._residual.sub_token_size}, refresh_every={self.refresh_every}")

    def describe(self) -> str:
        return f"pca p={self.principal} M={self._residual.sub_token_size}"

    def stored_bytes_per_token(self, dtype: torch.dtype) -> int:
        return (self.principal + self._residual.coefficients_per_token) * element_size(dtype)

    @torch.no_grad()
    def observe(self, x, forward):
        if forward % self.refresh_every:
            return
        x2 = x.detach().reshape(-1, self.width).float()
        moment = all_reduce_(torch.cat([x2.t().matmul(x2).flatten(), x2.new_tensor([x2.shape[0]])]))
        _, vecs = torch.linalg.eigh(moment[:-1].view(self.width, self.width) / moment[-1])
        top = vecs[:, -self.principal:].flip(1)                      # (D, p), largest first
        idx = top.abs().argmax(dim=0, keepdim=True)                  # eigh's signs are arbitrary: fix them
        self.basis.copy_(top * torch.sign(top.gather(0, idx)))

    @torch.no_grad()
    def encode(self, x, forward):
        seed, dtype = self.forward_seed(forward), compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            c, z = self.run(pca_encode, x.detach().reshape(-1, self.width), self.basis,
                            *self._residual.args(seed, x.device), dtype)
        return (c, z, self.basis), seed

    def decode(self, tensors, seed, dtype):
        c, z, basis = tensors
        return self.run(pca_decode, c, z, basis, *self._residual.args(seed, c.device), self.width, dtype)
