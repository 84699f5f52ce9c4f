"""VeLoRA benchmarks for docs/BENCHMARKS.md: saved activations and step time (CPU).

    python scripts/bench_velora.py memory --configs configs/llama_60m.json configs/llama_350m.json
    python scripts/bench_velora.py options --config configs/llama_60m.json
    python scripts/bench_velora.py time --config configs/llama_60m.json --reps 15
    python scripts/bench_velora.py time --config configs/llama_60m.json --variants full_rank,velora_all,sr2_all
    python scripts/bench_velora.py codecs --configs configs/llama_60m.json --variants velora_all,sr2_all
    python scripts/bench_velora.py time --config configs/llama_60m.json --variants sr2_all,sr2_all+fused
    python scripts/bench_velora.py cost --before /tmp/before/velora
    python scripts/bench_velora.py kernels --config configs/llama_60m.json --before /tmp/before/velora
    python scripts/bench_velora.py qkv --tokens 16384 --reps 7 --before /tmp/before/velora

`memory`: bytes saved for backward in one training step (batch x seq), none / paper / all, fp32 and
bf16 autocast, with the ratio to none. `options`: VeLoRA `all` and the model's memory options, each
alone and together, against the plain model. `codecs`: the same bytes for methods of
scripts/compare_galore.py (codecs, hybrids, memory options), against full-rank. `time`: forward+backward of each variant (a method of
scripts/compare_galore.py) against full-rank, the same weights and batch, interleaved repetitions (the
order rotates every repetition), medians and their ratio to full-rank; a `+fused` suffix sets
velora.fused=true for that variant. `cost`, `kernels` and `qkv` (training/bench/codec_cost.py): what the codecs
cost per compressed element and per step, eager and fused, against an older velora/ given by
`--before` (e.g. `git archive 27b879f velora | tar -x -C /tmp/before`).
Prints Markdown tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import LlamaForCausalLM  # noqa: E402
from training.config import load_config  # noqa: E402
from velora import apply_velora  # noqa: E402
from training.methods import METHODS  # noqa: E402
from training.plan.measure import build_and_measure  # noqa: E402

MIB = 2 ** 20


def _velora(cfg, targets):
    return dataclasses.replace(cfg.velora, targets=targets)


def memory_table(configs, batch_size, seq_len) -> str:
    rows = ["| model | dtype | VeLoRA | saved MiB | of which proj. inputs | weight copies | ratio to none | "
            "ratio without weight copies |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for path in configs:
        cfg = load_config(path)
        for dtype in ("fp32", "bf16"):
            base = None
            for targets in ("none", "paper", "all"):
                r = build_and_measure(cfg.model, _velora(cfg, targets), batch_size, seq_len, dtype)
                base = base or r
                rows.append(f"| {Path(path).stem} | {dtype} | {targets} | {r['saved_total'] / MIB:.2f} | "
                            f"{r['saved']['projection inputs'] / MIB:.2f} | {r['saved']['weight copies'] / MIB:.2f} | "
                            f"{r['saved_total'] / base['saved_total']:.3f} | "
                            f"{r['saved_activations'] / base['saved_activations']:.3f} |")
    return "\n".join(rows)


def options_table(path, batch_size, seq_len, loss_chunk) -> str:
    cfg = load_config(path)
    cases = [("plain full-rank", "none", {}),
             ("loss_chunk_size", "none", {"loss_chunk_size": loss_chunk}),
             ("recompute_swiglu", "none", {"recompute_swiglu": True}),
             ("VeLoRA all", "all", {}),
             ("VeLoRA all + loss_chunk_size + recompute_swiglu", "all",
              {"loss_chunk_size": loss_chunk, "recompute_swiglu": True})]
    rows = [f"| {Path(path).stem} fp32, {batch_size}x{seq_len} | saved MiB | saved by it MiB | ratio to plain |",
            "|---|---:|---:|---:|"]
    base = None
    for name, targets, options in cases:
        model_cfg = dataclasses.replace(cfg.model, **options)
        r = build_and_measure(model_cfg, _velora(cfg, targets), batch_size, seq_len, "fp32")
        base = base or r["saved_total"]
        rows.append(f"| {name} | {r['saved_total'] / MIB:.2f} | {(base - r['saved_total']) / MIB:.2f} | "
                    f"{r['saved_total'] / base:.3f} |")
    return "\n".join(rows)


def variants_table(configs, batch_size, seq_len, variants) -> str:
    rows = [f"| model, fp32, {batch_size}x{seq_len} | method | saved MiB | of which proj. inputs | ratio to full-rank |",
            "|---|---|---:|---:|---:|"]
    for path in configs:
        base = None
        for name in ["full_rank"] + [v for v in variants if v != "full_rank"]:
            cfg = load_config(path, [s for s in METHODS[name].sets if s.startswith(("velora.", "model."))])
            r = build_and_measure(cfg.model, cfg.velora, batch_size, seq_len, "fp32")
            base = base or r["saved_total"]
            rows.append(f"| {Path(path).stem} | {name} | {r['saved_total'] / MIB:.2f} | "
                        f"{r['saved']['projection inputs'] / MIB:.2f} | {r['saved_total'] / base:.3f} |")
    return "\n".join(rows)


def step_time(path, batch_size, seq_len, reps, variants) -> list[str]:
    torch.manual_seed(0)
    base = load_config(path)
    ids = torch.randint(0, base.model.vocab_size, (batch_size, seq_len))
    models = {}
    for name in ["full_rank"] + [v for v in variants if v != "full_rank"]:
        method, _, fused = name.partition("+")
        sets = [s for s in METHODS[method].sets if s.startswith(("velora.", "model."))]
        cfg = load_config(path, sets + (["velora.fused=true"] if fused == "fused" else []))
        model = LlamaForCausalLM(cfg.model)
        if models:
            model.load_state_dict(models["full_rank"].state_dict())
        models[name] = apply_velora(model, cfg.velora)[0]

    def run(model):
        t0 = time.perf_counter()
        model(ids, labels=ids).backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt

    for model in models.values():      # warm-up (and one-time codec initialisation)
        run(model)
    names = list(models)
    times = {k: [] for k in names}
    for i in range(reps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(run(models[name]))
    ref = statistics.median(times["full_rank"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        paired = statistics.median(a / b for a, b in zip(times[name], times["full_rank"]))
        rows.append(f"| {Path(path).stem} {batch_size}x{seq_len} fp32, {torch.get_num_threads()} threads, {reps} reps "
                    f"| {name} | {med * 1000:.0f} ms | {med / ref:.3f} | {paired:.3f} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("memory", "options", "codecs", "time", "cost", "kernels", "qkv"))
    p.add_argument("--configs", nargs="+", default=["configs/llama_60m.json", "configs/llama_350m.json"])
    p.add_argument("--config", default="configs/llama_60m.json")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--loss-chunk-size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--variants", default="velora_all", help="methods (training/methods.py) to compare with full_rank")
    p.add_argument("--before", help="an older velora/ package directory to measure beside this one")
    p.add_argument("--tokens", type=int, default=4096, help="cost, qkv: tokens of the q/k/v block")
    p.add_argument("--hidden", type=int, default=1024, help="cost, qkv: width of the q/k/v block")
    args = p.parse_args(argv)
    if args.what in ("cost", "kernels", "qkv"):
        from training.bench import codec_cost
        print(codec_cost.main(args))
        return 0
    if args.what == "memory":
        print(memory_table(args.configs, args.batch_size, args.seq_len))
    elif args.what == "options":
        print(options_table(args.config, args.batch_size, args.seq_len, args.loss_chunk_size))
    elif args.what == "codecs":
        print(variants_table(args.configs, args.batch_size, args.seq_len, args.variants.split(",")))
    else:
        print("| setup | variant | median | ratio of medians | median of paired ratios |")
        print("|---|---|---:|---:|---:|")
        print("\n".join(step_time(args.config, args.batch_size, args.seq_len, args.reps, args.variants.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
