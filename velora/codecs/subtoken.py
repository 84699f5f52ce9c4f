"""Sub-token projections: the paper's VeLoRA (a fixed unit vector v per input) and its unbiased
variant with an independent random vector per token and sub-token.

x (tokens, D) is split into K = ceil(D / M) sub-tokens of size M (the last one zero-padded) and only
their coefficients on r vectors are kept: K * r numbers per token instead of D.

`velora` (SubTokenBasis): z = x_sub vᵀ with v (r x M) shared by every token, set by the init rule.
grad_W is computed as (grad_yᵀ z) v: one 2-D fp32 matmul over all tokens, then a tiny (r x M)
expansion, M/r times cheaper than grad_yᵀ x̂ and equal to it in exact arithmetic. The weight
gradient is confined to a fixed subspace (see ../shared/research/ACTIVATION-COMPRESSION.md).

`rademacher` / `gaussian` (RandomSubToken): every token and sub-token draws its own r vectors s with
E[s sᵀ] = I (signs ±1, or standard normal), regenerated from the forward's seed in backward (never
stored); x̂ = (1/r) Σ_j (s_jᵀ x_sub) s_j, so E[x̂] = x and grad_W is unbiased.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.errors import ConfigError, check_positive

from ..config import check_coef_dtype, check_rank, parse_init
from . import rng
from .base import Codec, all_reduce_, element_size, host_value


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for input x: autocast's when active, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check_sizes(width: int, sub_token_size: int, rank: int) -> None:
    check_positive("velora.sub_token_size", sub_token_size, integer=True)
    check_rank(rank, sub_token_size, f"a {width}-wide input")


def split_sub_tokens(x2: torch.Tensor, m: int) -> torch.Tensor:
    """(tokens, D) -> (tokens, K, M), the tail zero-padded."""
    k = math.ceil(x2.shape[1] / m)
    return F.pad(x2, (0, k * m - x2.shape[1])).view(x2.shape[0], k, m)


class SubTokenBasis(Codec):
    """The `velora` codec: the unit vectors v (rank x M) for one input tensor and how they are set.

    Buffers: `v`, `initialized` and, for `ema:<decay>`, the running statistic `stat` (the mean
    sub-token for rank 1, the M x M second moment otherwise). Stored per forward: z (tokens x K*r, in
    the compute dtype, or int8 with a per-row fp32 scale) and a snapshot of v.
    """

    name = "velora"

    def __init__(self, width: int, sub_token_size: int, rank: int = 1, init: str = "batch_average_once",
                 coef_dtype: str = "compute", seed: int = 0, grad_scale: float = 1.0, device=None):
        super().__init__(width, seed, device)
        _check_sizes(width, sub_token_size, rank)
        check_coef_dtype(coef_dtype)
        if coef_dtype == "float16" and (rank != 1 or width % sub_token_size):
            raise ConfigError(f"velora.coef_dtype=float16 (the official code's arithmetic) needs rank 1 and a "
                              f"sub-token size that divides the width, got rank {rank}, M={sub_token_size}, "
                              f"width {width}; set velora.sub_token_size (or its override) to a divisor")
        self.decay = parse_init(init)
        self.sub_token_size, self.rank = sub_token_size, rank
        self.init, self.coef_dtype, self.grad_scale = init, coef_dtype, grad_scale
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
        self._frozen = False          # batch_average_once: Python copy of `initialized` (no device read)

    def extra_repr(self) -> str:
        return (f"width={self.width}, sub_token_size={self.sub_token_size}, rank={self.rank}, "
                f"init={self.init}, coef_dtype={self.coef_dtype}, grad_scale={self.grad_scale}")

    def describe(self) -> str:
        return (f"velora M={self.sub_token_size} r={self.rank}" + ("" if self.coef_dtype == "compute" else
                f" {self.coef_dtype}") + (f" x{self.grad_scale:g}" if self.grad_scale != 1 else ""))

    def stored_bytes_per_token(self, dtype: torch.dtype) -> int:
        n = self.num_sub_tokens * self.rank
        if self.coef_dtype == "int8":
            return n + 4
        return n * element_size(torch.float16 if self.coef_dtype == "float16" else dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen = self.init == "batch_average_once" and host_value(self.initialized, False)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, forward) -> None:
        if self._frozen or self.init == "random":
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
        if self.coef_dtype == "float16":   # the official code's float16 mean (on one rank: exactly its v)
            world = all_reduce_(torch.ones(1, device=x.device))
            return all_reduce_(x2.to(torch.float16).reshape(-1, m).mean(0).float()) / world
        if self.rank == 1:
            total = F.pad(x2.sum(0, dtype=torch.float32), (0, k * m - self.width)).reshape(k, m).sum(0)
        else:
            xs = split_sub_tokens(x2.float(), m).reshape(-1, m)
            total = xs.t().matmul(xs).flatten()
        count = torch.tensor([float(x2.shape[0] * k)], device=total.device)
        packed = all_reduce_(torch.cat([total, count]))
        return (packed[:-1] / packed[-1]).reshape((m,) if self.rank == 1 else (m, m))

    def _unit_vectors(self, stat: torch.Tensor) -> torch.Tensor:
        if self.coef_dtype == "float16":
            return F.normalize(stat.to(torch.float16), dim=-1).float().unsqueeze(0)
        if self.rank == 1:
            return F.normalize(stat, dim=0).unsqueeze(0)
        _, vecs = torch.linalg.eigh(stat)                     # ascending eigenvalues
        top = vecs[:, -self.rank:].flip(1).t()                # (rank, M), largest first
        # Fix each vector's sign (eigh's is arbitrary): largest-magnitude component positive.
        idx = top.abs().argmax(dim=1, keepdim=True)
        return top * torch.sign(top.gather(1, idx))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, forward) -> tuple[tuple, tuple | None]:
        if self.coef_dtype == "float16":   # the official einsum, in float16; meta: the leading (batch) shape
            x16 = x.detach().to(torch.float16).reshape(-1, self.sub_token_size)
            z = torch.einsum("h s, r s -> h", x16, self.v.to(torch.float16))
            return (z, None, self.v.detach().clone()), tuple(x.shape[:-1])
        v = self.v
        m, d = self.sub_token_size, self.width
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
        snapshot = v.detach().clone()
        if self.coef_dtype == "int8":
            zf = z.float()
            scale = zf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            q = (zf / scale).round_().clamp_(-127, 127).to(torch.int8)
            return (q, scale, snapshot), None
        return (z.to(compute_dtype(x)), None, snapshot), None

    def weight_grad(self, grad_y, tensors, meta, in_features, share=None):
        # (grad_yᵀ z) v: the expansion by v is M / r times cheaper than decoding x̂, so nothing is shared.
        z, scale, v = tensors
        if self.coef_dtype == "float16":
            return self._official_weight_grad(grad_y, z, v, meta, in_features)
        r = v.shape[0]
        z = (z.float() * scale).to(grad_y.dtype) if scale is not None else z.to(grad_y.dtype)
        a = grad_y.t().matmul(z).float()                                   # (out, K * r)
        gw = a.reshape(a.shape[0], -1, r).matmul(v.float()).reshape(a.shape[0], -1)[:, :in_features]
        return gw * self.grad_scale if self.grad_scale != 1 else gw

    def _official_weight_grad(self, grad_y, z, v, lead: tuple, in_features: int) -> torch.Tensor:
        """The official VeLoRA backward, op for op: x̂ = z v in float16, one float16 grad_yᵀ x̂ per sequence,
        times grad_scale in float16, then the float16 sum over sequences that autograd does for it."""
        batch = lead[0] if len(lead) > 1 else 1
        x_hat = torch.einsum("h, r s -> h s", z, v.to(torch.float16)).view(batch, -1, in_features)
        gy = grad_y.view(batch, -1, grad_y.shape[-1]).to(torch.float16)
        per_sequence = torch.matmul(gy.transpose(1, 2), x_hat)
        return (self.grad_scale * per_sequence).sum(0).float()


class RandomVectors:
    """r random vectors s per token and sub-token with E[s sᵀ] = I (signs ±1 or standard normal),
    the same for the same seed: `sketch` keeps the coefficients, `reconstruct` gives the unbiased x̂."""

    def __init__(self, width: int, sub_token_size: int, rank: int, kind: str):
        _check_sizes(width, sub_token_size, rank)
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"random sub-token vectors: kind must be rademacher or gaussian, got {kind!r}")
        self.width, self.sub_token_size, self.rank, self.kind = width, sub_token_size, rank, kind
        self.num_sub_tokens = math.ceil(width / sub_token_size)

    @property
    def coefficients_per_token(self) -> int:
        return self.num_sub_tokens * self.rank

    def args(self, seed: int, device) -> tuple:
        """The arguments of `sketch` / `reconstruct` after the tensor, for the stream of `seed`."""
        return (*rng.key_tensors(seed, device), self.kind, self.sub_token_size, self.rank)


def random_vectors(tokens: int, k: int, k0: int, k1: int, kind: str, m: int, r: int, device) -> torch.Tensor:
    """(tokens, K, r, M) fp32 vectors from the counter-based stream of key words k0, k1 (rng.py)."""
    draw = rng.normal if kind == "gaussian" else rng.signs
    return draw((tokens, k, r, m), k0, k1, device)


def _sum_in_order(terms) -> torch.Tensor:
    """Σ of the terms, added left to right: a fixed order (a library reduction may pick another), so
    the eager and the compiled code round alike."""
    total = None
    for t in terms:
        total = t if total is None else total + t
    return total


def sketch(x2: torch.Tensor, k0: int, k1: int, kind: str, m: int, r: int) -> torch.Tensor:
    """z (tokens, K*r) fp32: the coefficients of every sub-token of x2 (tokens, D) on its vectors."""
    xs = split_sub_tokens(x2.float(), m).unsqueeze(2)                       # (tokens, K, 1, M)
    s = random_vectors(x2.shape[0], xs.shape[1], k0, k1, kind, m, r, x2.device)
    return _sum_in_order(xs[..., j] * s[..., j] for j in range(m)).reshape(x2.shape[0], -1)


def reconstruct(z: torch.Tensor, k0: int, k1: int, kind: str, m: int, r: int, width: int) -> torch.Tensor:
    """x̂ (tokens, width) fp32 from the coefficients of `sketch`: E[x̂] = the sketched x."""
    n = z.shape[0]
    k = z.shape[1] // r
    s = random_vectors(n, k, k0, k1, kind, m, r, z.device)
    zr = z.float().view(n, k, r, 1)
    return (_sum_in_order(zr[:, :, j] * s[:, :, j] for j in range(r)) / r).reshape(n, -1)[:, :width]


def random_encode(x2: torch.Tensor, k0: int, k1: int, kind: str, m: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """`sketch` in `dtype`: what the random sub-token codecs store."""
    return sketch(x2, k0, k1, kind, m, r).to(dtype)


def random_decode(z: torch.Tensor, k0: int, k1: int, kind: str, m: int, r: int, width: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """`reconstruct` in `dtype`."""
    return reconstruct(z, k0, k1, kind, m, r, width).to(dtype)


class RandomSubToken(Codec):
    """The `rademacher` / `gaussian` codecs: r independent random vectors per token and sub-token,
    regenerated from the forward's seed in backward. Stored per forward: z (tokens x K*r)."""

    counts_forwards = True

    def __init__(self, width: int, sub_token_size: int, rank: int = 1, kind: str = "rademacher", seed: int = 0,
                 device=None):
        super().__init__(width, seed, device)
        self.random = RandomVectors(width, sub_token_size, rank, kind)
        self.name, self.sub_token_size, self.rank = kind, sub_token_size, rank

    def extra_repr(self) -> str:
        return f"{self.name}, width={self.width}, sub_token_size={self.sub_token_size}, rank={self.rank}"

    def describe(self) -> str:
        return f"{self.name} M={self.sub_token_size} r={self.rank}"

    def stored_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.random.coefficients_per_token * element_size(dtype)

    @torch.no_grad()
    def encode(self, x, forward):
        seed, dtype = self.forward_seed(forward), compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            z = self.run(random_encode, x.detach().reshape(-1, self.width), *self.random.args(seed, x.device), dtype)
        return (z,), seed

    def decode(self, tensors, seed, dtype):
        return self.run(random_decode, tensors[0], *self.random.args(seed, tensors[0].device), self.width, dtype)
