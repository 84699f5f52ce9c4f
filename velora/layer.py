"""VeLoRA layers: the sub-token basis v (one per input tensor) and the linear layer that uses it."""
from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import parse_init
from .function import Coefficients, compress, velora_linear

def _inside_backward() -> bool:
    # True while autograd runs backward, e.g. when activation checkpointing recomputes a forward:
    # statistics must not be updated a second time from that recomputation.
    return torch._C._current_graph_task_id() != -1


class SubTokenBasis(nn.Module):
    """The unit vectors v (rank x M) for one input tensor, how they are set, and the coefficients z.

    Buffers: `v`, `initialized` and, for `ema:<decay>`, the running statistic `stat` (the mean
    sub-token for rank 1, the M x M second moment otherwise). Every projection reading the same
    tensor shares one basis, and `coefficients(x)` computes z once per input tensor.
    """

    def __init__(self, width: int, sub_token_size: int, rank: int = 1, init: str = "batch_average_once",
                 coef_dtype: str = "compute", seed: int = 0, device=None):
        super().__init__()
        if sub_token_size < 1:
            raise ValueError(f"VeLoRA sub_token_size: must be >= 1, got {sub_token_size}")
        if not 1 <= rank <= sub_token_size:
            raise ValueError(f"VeLoRA rank: must be between 1 and sub_token_size={sub_token_size}, got {rank}; "
                             f"lower the rank or raise the sub-token size")
        if coef_dtype not in ("compute", "int8"):
            raise ValueError(f"VeLoRA coef_dtype: expected 'compute' or 'int8', got {coef_dtype!r}")
        self.decay = parse_init(init)
        self.width, self.sub_token_size, self.rank = width, sub_token_size, rank
        self.init, self.coef_dtype = init, coef_dtype
        self.num_sub_tokens = math.ceil(width / sub_token_size)
        self.register_buffer("v", torch.zeros(rank, sub_token_size, device=device))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        if self.decay is not None:
            shape = (sub_token_size,) if rank == 1 else (sub_token_size, sub_token_size)
            self.register_buffer("stat", torch.zeros(shape, device=device))
        if init == "random":
            g = torch.Generator().manual_seed(seed)
            v = torch.randn(sub_token_size, rank, generator=g)
            self.v.copy_(torch.linalg.qr(v).Q.t())   # orthonormal rows (unit vectors for rank 1)
            self.initialized.fill_(True)
        self._cache = None
        self._frozen = None           # Python copy of "v is final": avoids a device sync per forward
        self.last_stored_bytes = 0

    def extra_repr(self) -> str:
        return (f"width={self.width}, sub_token_size={self.sub_token_size}, rank={self.rank}, "
                f"init={self.init}, coef_dtype={self.coef_dtype}")

    def coefficients(self, x: torch.Tensor, user: nn.Module) -> Coefficients:
        """z for input x, updating v first as the init rule says (training forwards only).

        The result is cached by weak reference: another projection (`user`) reading the same tensor
        gets the very same z tensors, so autograd stores them once and x itself is freed. The same
        user calling again is a new step and recomputes (and updates v).
        """
        if self._cache is not None:
            ref_x, version, refs, users = self._cache
            tensors = [r() for r in refs]
            if (ref_x() is x and x._version == version and id(user) not in users
                    and all(t is not None for t in tensors)):
                users.add(id(user))
                z, v, scale = (tensors + [None])[:3]
                return Coefficients(z, scale, v, self.width)
        if not _inside_backward():
            self._update(x)
        coef = compress(x, self.v, self.coef_dtype)
        self._cache = (weakref.ref(x), x._version, [weakref.ref(t) for t in coef.tensors()], {id(user)})
        self.last_stored_bytes = coef.nbytes
        return coef

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen = None

    @torch.no_grad()
    def _update(self, x: torch.Tensor):
        if self._frozen is None:
            self._frozen = self.init == "random" or (self.init == "batch_average_once" and bool(self.initialized))
        if self._frozen:
            return
        stat = self._batch_statistic(x)
        if self.decay is not None:
            ema = self.decay * self.stat.float() + (1.0 - self.decay) * stat
            stat = torch.where(self.initialized, ema, stat)      # no host sync on GPU
            self.stat.copy_(stat)
        self.v.copy_(self._unit_vectors(stat))
        self.initialized.fill_(True)
        self._frozen = self.init == "batch_average_once"

    def _batch_statistic(self, x: torch.Tensor) -> torch.Tensor:
        """Mean sub-token (rank 1) or mean sub-token outer product (rank > 1), in fp32, averaged over
        every rank of a distributed run so that all ranks derive the same v."""
        m, k = self.sub_token_size, self.num_sub_tokens
        x2 = x.detach().reshape(-1, self.width)
        if self.rank == 1:
            total = F.pad(x2.sum(0, dtype=torch.float32), (0, k * m - self.width)).reshape(k, m).sum(0)
        else:
            xs = F.pad(x2.float(), (0, k * m - self.width)).reshape(-1, m)
            total = xs.t().matmul(xs).flatten()
        count = torch.tensor([float(x2.shape[0] * k)], device=total.device)
        packed = torch.cat([total, count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        return (packed[:-1] / packed[-1]).reshape((m,) if self.rank == 1 else (m, m))

    def _unit_vectors(self, stat: torch.Tensor) -> torch.Tensor:
        if self.rank == 1:
            return F.normalize(stat, dim=0).unsqueeze(0)
        _, vecs = torch.linalg.eigh(stat)                     # ascending eigenvalues
        top = vecs[:, -self.rank:].flip(1).t()                # (rank, M), largest first
        # Fix each vector's sign (eigh's is arbitrary): largest-magnitude component positive.
        idx = top.abs().argmax(dim=1, keepdim=True)
        return top * torch.sign(top.gather(1, idx))


class VeLoRALinear(nn.Module):
    """A drop-in `nn.Linear` whose backward keeps only rank-r sub-token coefficients of its input.

    Training forward (grad enabled): exact output, `SubTokenLinear` saves z instead of x.
    Eval mode or `no_grad`: a plain `F.linear`; v is never touched.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, sub_token_size: int = 0,
                 rank: int = 1, init: str = "batch_average_once", coef_dtype: str = "compute", seed: int = 0,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        m = sub_token_size or math.ceil(in_features / 64)
        basis_device = None if torch.device(device or "cpu").type == "meta" else device
        self.basis = SubTokenBasis(in_features, m, rank, init, coef_dtype, seed, device=basis_device)

    def reset_parameters(self):
        """nn.Linear's default initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, basis: SubTokenBasis, owns_basis: bool = True) -> "VeLoRALinear":
        """Wrap an existing nn.Linear, keeping its Parameter objects (names, optimizer state, sharing).

        Layers that read the same tensor share one `basis`; only its owner registers it, so its
        buffers appear once in the state dict (under the owner's name).
        """
        layer = cls(linear.in_features, linear.out_features, bias=False, sub_token_size=basis.sub_token_size,
                    rank=basis.rank, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        del layer._modules["basis"]
        if owns_basis:
            layer.basis = basis
        else:
            object.__setattr__(layer, "basis", basis)   # a plain reference, not a submodule
        return layer

    @property
    def v(self) -> torch.Tensor:
        return self.basis.v

    @property
    def initialized(self) -> torch.Tensor:
        return self.basis.initialized

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = x.requires_grad or self.weight.requires_grad
        if not (self.training and torch.is_grad_enabled() and needs_grad):
            return F.linear(x, self.weight, self.bias)
        return velora_linear(x, self.weight, self.bias, self.basis.coefficients(x, self))
