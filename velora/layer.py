"""CompressedLinear: a drop-in nn.Linear whose backward keeps only what its activation codec stores."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .codecs import Codec
from .function import compressed_linear


class CompressedLinear(nn.Module):
    """A linear layer whose training forward saves its codec's encoding of x instead of x.

    Training forward (grad enabled): exact output; backward computes grad_W from the codec (any of
    velora.config.CODECS). Eval mode or `no_grad`: a plain `F.linear`; the codec is never touched.
    """

    def __init__(self, linear: nn.Linear, codec: Codec, owns_codec: bool = True):
        """Take over `linear`'s Parameter objects (names, optimizer state, sharing), compressed by `codec`.

        Layers that read the same tensor share one `codec`; only its owner registers it, so its
        buffers appear once in the state dict (under the owner's name).
        """
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        if owns_codec:
            self.codec = codec
        else:
            object.__setattr__(self, "codec", codec)   # a plain reference, not a submodule

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = x.requires_grad or self.weight.requires_grad
        if not (self.training and torch.is_grad_enabled() and needs_grad):
            return F.linear(x, self.weight, self.bias)
        return compressed_linear(x, self.weight, self.bias, self.codec, self.codec.encoded(x, self))
