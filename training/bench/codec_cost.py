"""What the activation codecs cost: kernels, bytes moved and time (`scripts/bench_velora.py cost|kernels|qkv`).

Kernels and bytes are counted with a TorchDispatchMode: every aten op that is not a view or an
allocation is one kernel, reading its tensor arguments and writing its outputs (numel x element
size each). A codec function running compiled (velora.codecs.fused) counts as the loop nests
(kernels) and the bytes Inductor's scheduler reports for its graph (`metrics.nodes_num_elem`,
`metrics.num_bytes_accessed`, with the first call's shapes). The block is q/k/v as in attention: three
bias-free projections of one bf16 input, with bf16 weights (DeepSpeed's bf16 path).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

import velora
from velora.codecs import fused

ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}
_COMPILED_COST: dict = {}      # codec function -> (kernels, bytes) of its compiled graph


class KernelCounter(TorchDispatchMode):
    """Counts kernels and the bytes they read and write (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func not in ALLOCATIONS:
            self.kernels += 1
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor))
        return out


def _compiled_run(counter_of):
    """A stand-in for fused.run that runs compiled functions outside the counting mode and adds what
    Inductor reported for them to the current counter."""
    from torch._inductor import config, metrics
    config.fx_graph_cache = False                          # a cache hit reports no metrics
    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    log.setLevel(logging.INFO)
    log.propagate = False
    original = fused.run

    def run(fn, on, *args):
        if not on:
            return original(fn, on, *args)
        with _disable_current_modes():
            if fn not in _COMPILED_COST:
                metrics.reset()
                out = fused.compiled(fn)(*args)
                _COMPILED_COST[fn] = (len(metrics.nodes_num_elem), metrics.num_bytes_accessed)
            else:
                out = fused.compiled(fn)(*args)
        counter = counter_of()
        if counter is not None:
            counter.kernels += _COMPILED_COST[fn][0]
            counter.bytes += _COMPILED_COST[fn][1]
        return out
    return run


@contextlib.contextmanager
def counting():
    """Yields a function that counts a callable's kernels and bytes: `count(fn) -> KernelCounter`."""
    current = [None]
    original, fused.run = fused.run, _compiled_run(lambda: current[0])

    def count(fn):
        current[0] = KernelCounter()
        with current[0]:
            fn()
        counter, current[0] = current[0], None
        return counter
    try:
        yield count
    finally:
        fused.run = original


def load_before(path: str):
    """An older velora/ package, imported as `velora_before` beside this one."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location("velora_before", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["velora_before"] = module
    spec.loader.exec_module(module)
    return module


class QKV(nn.Module):
    """Three projections of one input, named as in attention (so apply_velora groups them)."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def block_variants(d: int, before) -> dict:
    """name -> the bf16 q/k/v block: plain nn.Linear, sr2 eager, sr2 fused (and sr2 of `before`)."""
    torch.manual_seed(0)
    plain = QKV(d).bfloat16()
    out = {"nn.Linear": plain}
    targets = ["q_proj", "k_proj", "v_proj"]
    packages = [("", velora)] + ([(" (before)", before)] if before else [])
    for suffix, package in packages:
        settings = [("eager", {"fused": False}), ("fused", {"fused": True})] if suffix == "" else [("eager", {})]
        for label, extra in settings:
            block = QKV(d).bfloat16()
            block.load_state_dict(plain.state_dict())
            cfg = package.VeLoRAConfig(targets=targets, codec="sr2", **extra)
            out[f"sr2 {label}{suffix}"] = package.apply_velora(block, cfg)[0]
    return out


def cost_table(tokens: int, d: int, before) -> str:
    """Kernels and bytes of one forward and one backward of the q/k/v block, and the codec's share per
    compressed element (the difference to nn.Linear over tokens x d)."""
    x = torch.randn(tokens, d, dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(tokens, d, dtype=torch.bfloat16) for _ in range(3)]
    rows = [f"| bf16 q/k/v block, {tokens} x {d} | kernels fwd | kernels bwd | MB fwd | MB bwd | "
            f"codec B/element: encode | decode | total |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = None
    with counting() as count:
        for name, block in block_variants(d, before).items():
            for _ in range(2):                       # the second step is counted (compiled, initialised)
                ys = []
                fwd = count(lambda: ys.extend(block(x)))
                bwd = count(lambda: torch.autograd.backward(ys, grads))
                x.grad = None
                block.zero_grad(set_to_none=True)
            base = base or (fwd, bwd)
            enc, dec = ((c.bytes - b.bytes) / (tokens * d) for c, b in zip((fwd, bwd), base))
            rows.append(f"| {name} | {fwd.kernels} | {bwd.kernels} | {fwd.bytes / 1e6:.1f} | {bwd.bytes / 1e6:.1f} | "
                        f"{enc:.2f} | {dec:.2f} | {enc + dec:.2f} |")
    return "\n".join(rows)


def kernels_table(config: str, batch_size: int, seq_len: int, before) -> str:
    """Kernels of one bf16 training step (forward + backward) of the model: full-rank, sr2_all eager and
    fused (and sr2_all of `before`), and the extra kernels per decoder layer against full-rank."""
    from model import LlamaForCausalLM
    from training.config import load_config
    cfg = load_config(config)
    ids = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len))
    cases = [("full-rank", None, {}), ("sr2_all eager", velora, {"fused": False}),
             ("sr2_all fused", velora, {"fused": True})] + ([("sr2_all eager (before)", before, {})] if before else [])
    rows = [f"| {Path(config).stem} bf16, {batch_size}x{seq_len} | kernels per step | extra per layer |",
            "|---|---:|---:|"]
    base = None
    with counting() as count:
        for name, package, extra in cases:
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg.model).bfloat16()
            if package is not None:
                model = package.apply_velora(model, package.VeLoRAConfig(setting="sr2_all", **extra))[0]
            for _ in range(2):
                c = count(lambda: model(ids, labels=ids).backward())
                model.zero_grad(set_to_none=True)
            base = base if base is not None else c.kernels
            rows.append(f"| {name} | {c.kernels} | {(c.kernels - base) / cfg.model.num_hidden_layers:.1f} |")
    return "\n".join(rows)


def qkv_time(tokens: int, d: int, reps: int, before) -> str:
    """Forward + backward time of the bf16 q/k/v block per variant, interleaved (the order rotates),
    medians and ratios to nn.Linear."""
    x = torch.randn(tokens, d, dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(tokens, d, dtype=torch.bfloat16) for _ in range(3)]
    blocks = block_variants(d, before)

    def run(block):
        t0 = time.perf_counter()
        torch.autograd.backward(block(x), grads)
        dt = time.perf_counter() - t0
        x.grad = None
        block.zero_grad(set_to_none=True)
        return dt

    for block in blocks.values():
        run(block)                                    # warm-up, compiles
    names = list(blocks)
    times = {n: [] for n in names}
    for i in range(reps):
        for n in names[i % len(names):] + names[:i % len(names)]:
            times[n].append(run(blocks[n]))
    ref = times["nn.Linear"]
    rows = [f"| bf16 q/k/v {tokens} x {d}, fwd+bwd, {torch.get_num_threads()} thread(s), {reps} reps | median | "
            f"ratio of medians | median of paired ratios |", "|---|---:|---:|---:|"]
    for n in names:
        paired = statistics.median(a / b for a, b in zip(times[n], ref))
        rows.append(f"| {n} | {statistics.median(times[n]) * 1000:.0f} ms | "
                    f"{statistics.median(times[n]) / statistics.median(ref):.3f} | {paired:.3f} |")
    return "\n".join(rows)


def main(args) -> str:
    """The table of `bench_velora.py cost|kernels|qkv`."""
    before = load_before(args.before) if args.before else None
    if args.what == "cost":
        return cost_table(args.tokens, args.hidden, before)
    if args.what == "kernels":
        return kernels_table(args.config, args.batch_size, args.seq_len, before)
    return qkv_time(args.tokens, args.hidden, args.reps, before)
