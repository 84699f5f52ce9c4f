"""Activation accounting: the bytes autograd saves for backward in one training step, by category.

    python -m velora.memory --config configs/llama_60m.json --velora all --batch-size 1 --seq-len 256

Saved tensors are seen through `torch.autograd.graph.saved_tensors_hooks` and counted once per
storage (q/k/v saving one tensor count it once; a view keeps its whole storage). Parameters and
buffers are not activations and are reported separately, with their gradients and AdamW's two fp32
states. `measure_step` works on any model whose `forward(ids, labels=ids)` returns the loss (ours)
or an object with `.loss` (transformers); only the CLI builds our LLaMA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.nn as nn

from .config import PRESETS, PROJECTIONS

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
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, totals = set(), dict.fromkeys(CATEGORIES, 0)
    with _module_stack(model) as stack:
        def pack(t):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in own and key not in seen:
                seen.add(key)
                totals[_category(stack, t)] += storage.nbytes()
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
        "parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_states": sum(2 * 4 * p.numel() for p in trainable),     # AdamW: exp_avg, exp_avg_sq
    }


def build_and_measure(model_cfg, velora_cfg, batch_size: int, seq_len: int, dtype: str = "fp32",
                      seed: int = 0) -> dict:
    """Build our LLaMA from `model_cfg` (model.LlamaConfig), apply VeLoRA, measure one step."""
    from model import LlamaForCausalLM   # the CLI's model; the accounting above needs only torch
    from .apply import apply_velora

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_cfg)
    model, summary = apply_velora(model, velora_cfg)
    ids = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len))
    report = measure_step(model, ids, torch.bfloat16 if dtype == "bf16" else None)
    report["velora_warnings"] = summary.warnings
    return report


def format_report(report: dict) -> str:
    """A readable table of `measure_step`'s result."""
    mib, tok = 2 ** 20, report["tokens"]
    lines = [f"{'saved for backward':<22}{'MiB':>10}{'B/token':>10}"]
    for cat, b in report["saved"].items():
        lines.append(f"  {cat:<20}{b / mib:>10.2f}{b / tok:>10.0f}")
    lines.append(f"  {'total':<20}{report['saved_total'] / mib:>10.2f}{report['saved_total'] / tok:>10.0f}")
    for key in ("parameters", "gradients", "optimizer_states"):
        lines.append(f"{key.replace('_', ' '):<22}{report[key] / mib:>10.2f}")
    lines += [f"warning: {w}" for w in report.get("velora_warnings", [])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m velora.memory", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config JSON (or a bare GaLore model JSON)")
    p.add_argument("--velora", choices=list(PRESETS), help="override velora.targets with a preset")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=0, help="default: the config's data.seq_len")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, fp32 weights")
    p.add_argument("--loss-chunk-size", type=int, help="set model.loss_chunk_size")
    p.add_argument("--recompute-swiglu", action="store_true", help="set model.recompute_swiglu")
    p.add_argument("--activation-checkpointing", action="store_true", help="set model.activation_checkpointing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from training.config import ConfigError, load_config
    overrides = list(args.set)
    if args.velora:
        overrides.append(f"velora.targets={args.velora}")
    if args.loss_chunk_size is not None:
        overrides.append(f"model.loss_chunk_size={args.loss_chunk_size}")
    if args.recompute_swiglu:
        overrides.append("model.recompute_swiglu=true")
    if args.activation_checkpointing:
        overrides.append("model.activation_checkpointing=true")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.batch_size <= 0 or args.seq_len < 0:
        print("error: --batch-size must be positive and --seq-len >= 0", file=sys.stderr)
        return 2
    seq_len = args.seq_len or cfg.data.seq_len
    report = build_and_measure(cfg.model, cfg.velora, args.batch_size, seq_len, args.dtype)
    report.update(config=args.config, velora=cfg.velora.targets, dtype=args.dtype, batch_size=args.batch_size,
                  seq_len=seq_len)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
