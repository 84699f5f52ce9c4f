"""apply_velora: swap a model's nn.Linear projections (HF names) for VeLoRA layers, in place."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .codecs import Codec, make_codec, mix_seed
from .config import GROUPS, PROJECTIONS, VeLoRAConfig
from .layer import CompressedLinear


@dataclass
class InputGroup:
    """One input tensor read by one or more compressed projections of the same parent module."""

    parent: str                  # e.g. "model.layers.0.self_attn"
    projections: tuple           # compressed projections reading it, e.g. ("q_proj", "k_proj", "v_proj")
    width: int                   # D
    codec: Codec                 # what the input keeps for backward (shared by the projections)
    frees_input: bool            # False when an uncompressed sibling still saves the same tensor

    def stored_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.codec.stored_bytes_per_token(dtype)


@dataclass
class VeLoRASummary:
    """What `apply_velora` replaced. `str(summary)` is a table; `warnings` lists partial groups."""

    modules: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def stored_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of coefficients kept for backward per token (all layers), z in `dtype`."""
        return sum(g.stored_bytes_per_token(dtype) for g in self.groups)

    def freed_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes per token of projection inputs no longer kept (inputs in `dtype`), minus the
        coefficients; partial groups free nothing and still store their coefficients."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum((g.width * size if g.frees_input else 0) - g.stored_bytes_per_token(dtype) for g in self.groups)

    def __str__(self) -> str:
        if not self.groups:
            return "VeLoRA: no projections replaced"
        rows = [("input of", "projections", "D", "codec", "B/token (fp32)", "frees input")]
        for g in self.groups:
            rows.append((g.parent, "+".join(g.projections), str(g.width), g.codec.describe(),
                         str(g.stored_bytes_per_token(torch.float32)), "yes" if g.frees_input else "NO (partial group)"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"{len(self.modules)} projections in {len(self.groups)} input groups; stored "
                     f"{self.stored_bytes_per_token()} B/token (fp32), inputs freed net "
                     f"{self.freed_bytes_per_token()} B/token (fp32)")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _input_groups(names: list) -> list:
    """Split a parent's projection names into lists that read the same input tensor."""
    groups = [[n for n in g if n in names] for g in GROUPS]
    grouped = {n for g in GROUPS for n in g}
    return [g for g in groups if g] + [[n] for n in names if n not in grouped]


def _group_codec(cfg: VeLoRAConfig, chosen: list, first: nn.Linear, index: int) -> Codec:
    """One codec per input tensor: for the codec and for M, the first member with an override decides."""
    by_codec = [n for n in chosen if n in cfg.codec_overrides] or chosen
    by_m = [n for n in chosen if n in cfg.sub_token_overrides] or chosen
    name = cfg.codec_for(by_codec[0])
    # velora's `random` init keeps its seed rule (seed + group index); the random codecs mix both.
    seed = cfg.seed + index if name == "velora" else mix_seed(cfg.seed, index)
    return make_codec(name, first.in_features, sub_token_size=cfg.sub_token_for(by_m[0], first.in_features),
                      rank=cfg.rank, init=cfg.init, coef_dtype=cfg.coef_dtype, grad_scale=cfg.grad_scale,
                      group_size=cfg.group_size, refresh_every=cfg.refresh_every, seed=seed, fused=cfg.fused,
                      device=first.weight.device)


def apply_velora(model: nn.Module, cfg: VeLoRAConfig):
    """Replace the targeted `nn.Linear` projections of `model` by `CompressedLinear`, in place.

    Projections are found by their HF attribute names (q/k/v/o_proj, gate/up/down_proj) on any
    module, so this works on our LLaMA and on `transformers` models alike. Parameters are kept
    (same objects, same names). Projections reading the same tensor share one basis and one z.
    Returns `(model, VeLoRASummary)`.
    """
    summary = VeLoRASummary()
    targets = set(cfg.target_list)
    if not targets:
        return model, summary
    found, partial = set(), {}
    for parent_name, parent in list(model.named_modules()):
        linears = [n for n in PROJECTIONS if isinstance(getattr(parent, n, None), nn.Linear)
                   and n in parent._modules]
        for members in _input_groups(linears):
            chosen = [n for n in members if n in targets]
            found.update(chosen)
            if not chosen:
                continue
            first = parent._modules[chosen[0]]
            codec = _group_codec(cfg, chosen, first, index=len(summary.groups))
            for i, n in enumerate(chosen):
                setattr(parent, n, CompressedLinear(parent._modules[n], codec, owns_codec=i == 0))
                summary.modules.append(f"{parent_name}.{n}" if parent_name else n)
            left_out = [n for n in members if n not in chosen]
            if left_out:
                partial.setdefault((tuple(chosen), tuple(left_out)), []).append(parent_name)
            summary.groups.append(InputGroup(parent_name, tuple(chosen), first.in_features, codec,
                                             frees_input=not left_out))
    for (chosen, left_out), parents in partial.items():
        summary.warnings.append(
            f"{', '.join(chosen)} compressed but {', '.join(left_out)} read the same input and still save "
            f"it, so this saves nothing for that input (in {len(parents)} module(s), e.g. {parents[0]}); "
            f"add {', '.join(left_out)} to velora.targets")
    missing = sorted(targets - found, key=PROJECTIONS.index)
    if missing:
        summary.warnings.append(f"no nn.Linear named {', '.join(missing)} found in the model")
    return model, summary


def stored_bytes(model: nn.Module) -> int:
    """Bytes the codecs kept for backward by the model's last training forward
    (one micro-batch), summed over input tensors: a number for logs and TensorBoard."""
    codecs = {id(m): m for m in model.modules() if isinstance(m, Codec)}
    return sum(c.last_stored_bytes for c in codecs.values())


def is_codec_state(key: str) -> bool:
    """True for a state-dict key that belongs to a codec (e.g. `model.layers.0.mlp.down_proj.codec.v`)
    rather than to the model: what VeLoRA adds to a checkpoint."""
    parts = key.split(".")
    return any(p in PROJECTIONS and nxt == "codec" for p, nxt in zip(parts, parts[1:]))


def strip_state_dict(state_dict: dict) -> dict:
    """`state_dict` without the codecs' buffers: the tensors of the plain model VeLoRA was applied
    to (VeLoRA changes what backward stores, never the function the model computes)."""
    return {k: v for k, v in state_dict.items() if not is_codec_state(k)}

