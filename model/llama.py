"""A LLaMA decoder with Hugging Face parameter names, small enough to read top to bottom.

Nothing here knows about training or VeLoRA: VeLoRA swaps the `nn.Linear` projections afterwards
(see velora/apply.py), which works because every projection is a plain attribute named as in HF.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig

IGNORE_INDEX = -100  # the label the loss skips: transformers' convention (data/packing.py IGNORE)


class _RMSNormFn(torch.autograd.Function):
    """weight * normalize(x), keeping only x and 1/rms for backward.

    Plain autograd would also keep the normalised activations (D numbers per token per norm);
    recomputing them in backward is one cheap elementwise pass.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        # Normalise in fp32 (as HF does) so bf16 runs do not lose the variance's precision.
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        n = x.float() * rstd
        g = grad.float()
        grad_w = (g * n.to(x.dtype).float()).reshape(-1, n.shape[-1]).sum(0)
        gn = g * weight.float()
        grad_x = rstd * (gn - n * (gn * n).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (HF's non-interleaved "rotate_half" layout)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Not persistent: HF does not store inv_freq in checkpoints either.
        self.register_buffer("inv_freq", self._inv_freq(head_dim, theta), persistent=False)
        self.head_dim, self.theta = head_dim, theta

    @staticmethod
    def _inv_freq(head_dim: int, theta: float) -> torch.Tensor:
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))

    def init_weights(self):
        # Buffers created on the meta device must be rebuilt when the model is materialised.
        self.inv_freq = self._inv_freq(self.head_dim, self.theta).to(self.inv_freq.device)

    def forward(self, seq_len: int, device, dtype):
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # q, k and v read the same x: VeLoRA compresses them as one group so x itself can be freed.
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u that keeps only g and u for backward (recomputes silu(g) there)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        sig = torch.sigmoid(g)
        silu = g * sig
        grad_g = grad * u * (sig * (1 + g * (1 - sig)))
        return grad_g, grad * silu


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.recompute_swiglu = cfg.recompute_swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        h = _SwiGLU.apply(g, u) if self.recompute_swiglu else F.silu(g) * u
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(input_ids.shape[1], x.device, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


def _chunk_loss_sum(lm_head: nn.Linear, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class LlamaForCausalLM(nn.Module):
    """LLaMA with an untied LM head. `forward(ids)` -> logits; `forward(ids, labels=...)` -> mean loss."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, initializer_range) for every matrix, ones for the norms (HF's LLaMA init)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, (RMSNorm, RotaryEmbedding)):
                m.init_weights()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.model(input_ids)
        if labels is None:
            return self.lm_head(h)
        # Labels are aligned with the inputs; position t predicts token t+1 (HF's convention).
        # Shift the labels rather than h: slicing h would copy the whole hidden state.
        h = h.reshape(-1, h.shape[-1])
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        n_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)
        chunk = self.config.loss_chunk_size
        if not chunk or not torch.is_grad_enabled():
            return _chunk_loss_sum(self.lm_head, h, labels) / n_tokens
        # Each chunk's logits are recomputed in backward, so no full (tokens x vocab) fp32 tensor
        # outlives its chunk.
        total = sum(checkpoint(_chunk_loss_sum, self.lm_head, h[i:i + chunk], labels[i:i + chunk],
                               use_reentrant=False)
                    for i in range(0, h.shape[0], chunk))
        return total / n_tokens
