"""VeLoRA benchmarks for docs/BENCHMARKS.md: saved activations and step time (CPU).

    python scripts/bench_velora.py memory --configs configs/llama_60m.json configs/llama_350m.json
    python scripts/bench_velora.py options --config configs/llama_60m.json
    python scripts/bench_velora.py time --config configs/llama_60m.json --reps 15

`memory`: bytes saved for backward in one training step (batch x seq), none / paper / all, fp32 and
bf16 autocast, with the ratio to none. `options`: VeLoRA `all` and the model's memory options, each
alone and together, against the plain model. `time`: forward+backward of VeLoRA `all` vs none, the
same weights and batch, interleaved repetitions (ABBA order), medians and their ratio.
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
from velora import VeLoRAConfig, apply_velora  # noqa: E402
from velora.memory import build_and_measure  # noqa: E402

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


def step_time(path, batch_size, seq_len, reps) -> str:
    cfg = load_config(path)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(cfg.model)
    velora = LlamaForCausalLM(cfg.model)
    velora.load_state_dict(plain.state_dict())
    velora, _ = apply_velora(velora, VeLoRAConfig(targets="all"))
    ids = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len))

    def run(model):
        t0 = time.perf_counter()
        model(ids, labels=ids).backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt

    for model in (plain, velora):      # warm-up (and VeLoRA's one-time v initialisation)
        run(model)
    times = {"none": [], "all": []}
    for i in range(reps):
        order = [("none", plain), ("all", velora)]
        for name, model in (order if i % 2 == 0 else order[::-1]):
            times[name].append(run(model))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [a / n for a, n in zip(times["all"], times["none"])]
    return (f"| {Path(path).stem} {batch_size}x{seq_len} fp32, {torch.get_num_threads()} threads, {reps} reps | "
            f"{med['none'] * 1000:.0f} ms | {med['all'] * 1000:.0f} ms | {med['all'] / med['none']:.3f} | "
            f"{statistics.median(ratios):.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("memory", "options", "time"))
    p.add_argument("--configs", nargs="+", default=["configs/llama_60m.json", "configs/llama_350m.json"])
    p.add_argument("--config", default="configs/llama_60m.json")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--loss-chunk-size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    if args.what == "memory":
        print(memory_table(args.configs, args.batch_size, args.seq_len))
    elif args.what == "options":
        print(options_table(args.config, args.batch_size, args.seq_len, args.loss_chunk_size))
    else:
        print("| setup | none (median) | all (median) | ratio of medians | median of paired ratios |")
        print("|---|---:|---:|---:|---:|")
        print(step_time(args.config, args.batch_size, args.seq_len, args.reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
