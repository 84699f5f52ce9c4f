"""Activation accounting: the bytes autograd saves for backward in one training step, by category
(the command line is scripts/velora_memory.py).

Saved tensors are seen through `torch.autograd.graph.saved_tensors_hooks` and counted by the house's
one byte-count rule (common/tensor_bytes.py: each storage once, by identity). Parameters and
buffers are not activations and are reported separately, with their gradients and AdamW's two fp32
states. `measure_step` works on any model whose `forward(ids, labels=ids)` returns the loss (ours)
or an object with `.loss` (transformers).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from common.tensor_bytes import StorageCount, state_bytes

from .config import PROJECTIONS

CATEGORIES = ("projection inputs", "attention", "norms", "mlp activations", "logits/loss",
              "weight copies", "other")


def _category(stack: list, t: torch.Tensor) -> str:
    """Where a saved tensor comes from, judged by the innermost running modules."""
    name, module = stack[-1]
    leaf = name.rsplit(".", 1)[-1]
    if leaf in PROJECTIONS or leaf == "lm_head":
        weight = getattr(module, "weight", None)
        if weight is not None and t.shape in (weight.shape, weight.t().shape):
            return "weight copies"      # autocast's low-precision copy of the weight, kept by F.linear
        return "projection inputs" if leaf != "lm_head" else "logits/loss"
    if "norm" in type(module).__name__.lower():
        return "norms"
    for name, _ in reversed(stack):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "attn", "attention"):
            return "attention"
        if leaf in ("mlp", "feed_forward"):
            return "mlp activations"
    return "logits/loss" if len(stack) == 1 else "other"   # the root computes the loss


@contextlib.contextmanager
def _module_stack(model: nn.Module):
    stack = [("", model)]
    handles = []
    for name, module in model.named_modules():
        if module is model:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append((n, m))))
        handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None, always_call=True))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def saved_bytes(model: nn.Module, step) -> dict:
    """Run `step()` (a training forward) and return {category: bytes saved for backward}, counting
    each storage once and leaving out the model's parameters and buffers."""
    counted = StorageCount(list(model.parameters()) + list(model.buffers()))
    totals = dict.fromkeys(CATEGORIES, 0)
    with _module_stack(model) as stack:
        def pack(t):
            n = counted.add(t)
            if n:
                totals[_category(stack, t)] += n
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = step()
    del out
    return totals


def measure_step(model: nn.Module, input_ids: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> dict:
    """Saved-for-backward bytes of one training forward on `input_ids` (labels = inputs), plus exact
    parameter, gradient and AdamW state bytes. Returns a JSON-ready dict."""
    model.train()

    def step():
        with torch.autocast(input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(input_ids, labels=input_ids)
        return out if isinstance(out, torch.Tensor) else out.loss

    saved = saved_bytes(model, step)
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    activations = sum(v for k, v in saved.items() if k != "weight copies")
    return {
        "tokens": input_ids.numel(),
        "saved": saved,
        "saved_total": sum(saved.values()),
        "saved_activations": activations,
        "parameters": state_bytes(params),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_states": sum(2 * 4 * p.numel() for p in trainable),     # AdamW: exp_avg, exp_avg_sq
    }
