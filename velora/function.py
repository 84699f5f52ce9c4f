"""The autograd function of every compressed projection: an exact linear forward that saves what an
activation codec keeps instead of the input x.

  forward  y = x Wᵀ + b                 exactly F.linear (under autocast too)
  grad_x = grad_y W                     exact, needs no x
  grad_W = codec.weight_grad(grad_y, stored)   grad_yᵀ x̂ as one 2-D matmul over all tokens, in grad_y's
                                               dtype (bf16 with fp32 accumulation in a bf16 run);
                                               x̂ decoded once per input tensor (Encoded.share)
  grad_b = Σ grad_y
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .codecs import Codec, Encoded


class CompressedLinear(torch.autograd.Function):
    """y = x Wᵀ + b, saving the codec's tensors instead of x.

    The weight is an argument (not read from a module) so DeepSpeed ZeRO-3 gathers it for both
    passes. Under autocast the forward computes exactly as `F.linear` does; backward casts the weight
    itself instead of keeping the cast copy `F.linear` would save.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, codec, meta, share, *stored):
        ctx.save_for_backward(weight, bias, *stored)
        ctx.codec, ctx.meta, ctx.share = codec, meta, share
        if ctx.needs_input_grad[1]:
            share.pending += 1          # one more backward will read x̂
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        weight, bias, *stored = ctx.saved_tensors
        out_f, in_f = weight.shape
        gy = grad_y.reshape(-1, out_f)
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad_y.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = gy.matmul(weight.to(gy.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                gw = ctx.codec.weight_grad(gy, tuple(stored), ctx.meta, in_f, ctx.share)
                grad_w = gw.to(weight.dtype).contiguous()
            if bias is not None and ctx.needs_input_grad[2]:
                grad_b = gy.sum(0, dtype=torch.float32).to(bias.dtype)
        return (grad_x, grad_w, grad_b, None, None, None) + (None,) * len(stored)


def compressed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, codec: Codec,
                      encoded: Encoded) -> torch.Tensor:
    """Apply `CompressedLinear` with what `codec` encoded for x (possibly shared with other projections)."""
    return CompressedLinear.apply(x, weight, bias, codec, encoded.meta, encoded.share, *encoded.tensors)
