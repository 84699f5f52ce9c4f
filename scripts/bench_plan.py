"""The memory planner against real CPU steps, for docs/BENCHMARKS.md.

    python scripts/bench_plan.py --config configs/llama_20m.json --micro-batch 1 4
    python scripts/bench_plan.py --config configs/llama_20m.json --deepspeed full_rank:0 full_rank:2 zero_offload:2

Without --deepspeed: for every planner method and micro-batch, plan_memory's fake-tensor prediction beside
the same step on real CPU tensors (plan_memory(fake=False), the same tracker): peak and every part, and the
largest relative difference. With --deepspeed METHOD:STAGE ...: the prediction beside a real DeepSpeed
engine (one process, gloo) running two steps under the planner's tracker (peak of the second step); on a
CPU, ZeRO-Offload's host and device memory are one, so its prediction is GPU + host bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from training.config import load_config  # noqa: E402
from training.methods import PLANNED  # noqa: E402
from training.plan.plan import method_config, plan_memory  # noqa: E402
from training.plan.tracker import MemoryTracker  # noqa: E402

MIB = 2 ** 20


def fake_vs_real(cfg, batches: list, dtype: str) -> list[str]:
    """Markdown rows: method, batch, predicted and measured peak, the largest part difference."""
    rows = ["| method | micro-batch | predicted peak MiB | real CPU step MiB | peak diff | largest part diff |",
            "|---|---:|---:|---:|---:|---:|"]
    for method in PLANNED:
        for b in batches:
            fake = plan_memory(cfg, method, b, 0, 1, dtype)
            real = plan_memory(cfg, method, b, 0, 1, dtype, fake=False)
            worst = max(abs(fake["parts"][k] - v) / max(v, 1) for k, v in real["parts"].items())
            rows.append(f"| {method} | {b} | {fake['peak_bytes'] / MIB:.2f} | {real['peak_bytes'] / MIB:.2f} | "
                        f"{abs(fake['peak_bytes'] / real['peak_bytes'] - 1):.2%} | {worst:.2%} |")
            print(rows[-1], flush=True)
    return rows


def deepspeed_step(cfg, batch: int) -> int:
    """Peak live bytes of the second of two real DeepSpeed engine steps, under the planner's tracker."""
    from training.build import build_engine, build_model, seed_everything

    tracker = MemoryTracker()
    with tracker:
        seed_everything(cfg.train.seed)
        model, _ = build_model(cfg)
        engine, _ = build_engine(model, cfg)
        ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
        for step in (1, 2):
            tracker.phase(f"step{step}")
            loss = engine(ids, labels=ids)
            engine.backward(loss)
            del loss
            engine.step()
    return tracker.phases["step2"]["peak_bytes"]


def against_deepspeed(cfg, cases: list, batch: int, dtype: str) -> list[str]:
    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    deepspeed.init_distributed(dist_backend="gloo")
    rows = ["| method | ZeRO | predicted (GPU + host) MiB | real DeepSpeed step MiB | ratio |", "|---|---:|---:|---:|---:|"]
    for case in cases:
        method, stage = case.split(":")
        mcfg = method_config(cfg, method, batch, int(stage), 1, dtype)
        plan = plan_memory(mcfg, method, batch, int(stage), 1, dtype)
        real = deepspeed_step(mcfg, batch)
        predicted = plan["peak_bytes"] + plan["host_bytes"]
        rows.append(f"| {method} | {plan['zero_stage']} | {predicted / MIB:.2f} | {real / MIB:.2f} | {predicted / real:.4f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/llama_20m.json")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--deepspeed", nargs="+", metavar="METHOD:STAGE", help="compare with real DeepSpeed steps")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(f"config {args.config} {' '.join(args.set)}, seq {cfg.data.seq_len}, {args.dtype}")
    if args.deepspeed:
        rows = against_deepspeed(cfg, args.deepspeed, args.micro_batch[0], args.dtype)
    else:
        rows = fake_vs_real(cfg, args.micro_batch, args.dtype)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
