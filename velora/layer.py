"""VeLoRALinear: a drop-in nn.Linear whose backward keeps only what its activation codec stores."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .codecs import Codec, make_codec
from .function import compressed_linear


class VeLoRALinear(nn.Module):
    """A linear layer whose training forward saves the codec's encoding of x instead of x.

    Training forward (grad enabled): exact output; backward computes grad_W from the codec.
    Eval mode or `no_grad`: a plain `F.linear`; the codec is never touched. `codec` is the codec name
    (velora.config.CODECS); the keyword arguments after it are `make_codec`'s.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, sub_token_size: int = 0,
                 rank: int = 1, init: str = "batch_average_once", coef_dtype: str = "compute", seed: int = 0,
                 codec: str = "velora", group_size: int = 128, refresh_every: int = 200, grad_scale: float = 1.0,
                 fused="auto", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.codec = make_codec(codec, in_features, sub_token_size=sub_token_size or math.ceil(in_features / 64),
                                rank=rank, init=init, coef_dtype=coef_dtype, grad_scale=grad_scale,
                                group_size=group_size, refresh_every=refresh_every, seed=seed, fused=fused,
                                device=device)

    def reset_parameters(self):
        """nn.Linear's default initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def wrap(cls, linear: nn.Linear, codec: Codec, owns_codec: bool = True) -> "VeLoRALinear":
        """Wrap an existing nn.Linear, keeping its Parameter objects (names, optimizer state, sharing).

        Layers that read the same tensor share one `codec`; only its owner registers it, so its
        buffers appear once in the state dict (under the owner's name).
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        if owns_codec:
            layer.codec = codec
        else:
            object.__setattr__(layer, "codec", codec)   # a plain reference, not a submodule
        return layer

    @property
    def v(self) -> torch.Tensor:
        """The `velora` codec's unit vectors (rank x M)."""
        return self.codec.v

    @property
    def initialized(self) -> torch.Tensor:
        return self.codec.initialized

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = x.requires_grad or self.weight.requires_grad
        if not (self.training and torch.is_grad_enabled() and needs_grad):
            return F.linear(x, self.weight, self.bias)
        return compressed_linear(x, self.weight, self.bias, self.codec, self.codec.encoded(x, self))
