"""The VeLoRA autograd function: an exact linear forward that keeps only sub-token coefficients.

For an input x of width D split into K = ceil(D / M) sub-tokens of size M (the last one zero-padded)
and unit vectors v (r x M), the coefficients are z = x_sub vᵀ (r numbers per sub-token). Backward:
  grad_x = grad_y W                    exact, needs no x
  grad_W = grad_yᵀ x̂, x̂ = z v          computed as (grad_yᵀ z) v: one 2-D matmul over all tokens in
                                       fp32, then a tiny (r x M) expansion; M/r times cheaper than
                                       the dense product and equal to it in exact arithmetic
  grad_b = Σ grad_y
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Coefficients:
    """What one compressed input leaves for backward (shared by every projection reading it)."""

    z: torch.Tensor                 # (tokens, K * r): compute dtype, or int8 when `scale` is set
    scale: torch.Tensor | None      # (tokens, 1) fp32 per-row scale for int8 z, else None
    v: torch.Tensor                 # (r, M) snapshot of the unit vectors used to compute z
    width: int                      # D

    def tensors(self) -> list:
        return [self.z, self.v] + ([self.scale] if self.scale is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for input x: autocast's when active, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@torch.no_grad()
def compress(x: torch.Tensor, v: torch.Tensor, coef_dtype: str = "compute") -> Coefficients:
    """z = x_sub vᵀ for every sub-token of x (..., D); `coef_dtype` is `compute` or `int8`."""
    r, m = v.shape
    d = x.shape[-1]
    full = d // m
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, d)
        vt = v.to(x.dtype).t()
        # Full sub-tokens are a strided view of x (no copy); the zero-padded tail is a short product.
        z = x2[:, :full * m].reshape(x2.shape[0], full, m).matmul(vt)
        if full * m < d:
            tail = x2[:, full * m:].matmul(vt[: d - full * m])
            z = torch.cat([z, tail.unsqueeze(1)], dim=1)
        z = z.reshape(x2.shape[0], -1)
    if coef_dtype == "int8":
        zf = z.float()
        scale = zf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        q = (zf / scale).round_().clamp_(-127, 127).to(torch.int8)
        return Coefficients(q, scale, v.detach().clone(), d)
    return Coefficients(z.to(compute_dtype(x)), None, v.detach().clone(), d)


class SubTokenLinear(torch.autograd.Function):
    """y = x Wᵀ + b, saving the coefficients (z, scale, v) instead of x.

    The weight is an argument (not read from a module) so DeepSpeed ZeRO-3 gathers it for both
    passes. Under autocast the forward computes exactly as `F.linear` does; backward casts the weight
    itself instead of keeping the cast copy `F.linear` would save.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, z, scale, v):
        ctx.save_for_backward(weight, bias, z, scale, v)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        weight, bias, z, scale, v = ctx.saved_tensors
        out_f, in_f = weight.shape
        gy = grad_y.reshape(-1, out_f)
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad_y.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = gy.matmul(weight.to(gy.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                r, m = v.shape
                zf = z.float() * scale if scale is not None else z.float()
                a = gy.float().t().matmul(zf)                              # (out, K * r), fp32
                gw = a.reshape(out_f, -1, r).matmul(v.float()).reshape(out_f, -1)[:, :in_f]
                grad_w = gw.to(weight.dtype).contiguous()
            if bias is not None and ctx.needs_input_grad[2]:
                grad_b = gy.sum(0, dtype=torch.float32).to(bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def velora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  coef: Coefficients) -> torch.Tensor:
    """Apply `SubTokenLinear` with precomputed coefficients (possibly shared with other projections)."""
    return SubTokenLinear.apply(x, weight, bias, coef.z, coef.scale, coef.v)
