"""Optimizer state per rank under ZeRO, exact tensor bytes, for docs/BENCHMARKS.md (CPU, gloo).

    python scripts/bench_optim_state.py --config configs/llama_60m.json --stages 0 2 3

For each optimizer (AdamW, Adafactor, GaLore AdamW by default) and each layout (--stages: ZeRO 0 on one
process, ZeRO 1-3 on --world processes; default 0 and 2) it builds the run's model through build_engine,
takes --steps optimizer steps on random tokens (batch 1 x --seq-len per rank, fp32) and counts every
tensor reachable from the client optimizer's state on each rank (GaLore's projectors included, and also
reported alone). ZeRO's own fp32 partition of the weights is not optimizer state and is not counted.
Prints a Markdown table and the issue's two goals: Adafactor at ZeRO 2 below 5% of AdamW at ZeRO 2,
and GaLore at ZeRO 2 below its ZeRO 0 state / world size + its projectors.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from training.distributed import free_port, spawn_local  # noqa: E402
from common.tensor_bytes import state_bytes  # noqa: E402

MIB = 2 ** 20


def _measure(args, name: str, stage: int, rank: int, world: int) -> tuple[int, int]:
    """(state bytes, projector bytes) on this rank after args.steps steps of optimizer `name`."""
    from training.build import build_engine, build_model, seed_everything
    from training.config import load_config

    cfg = load_config(args.config, [f"optim.name={name}", f"deepspeed.zero_optimization.stage={stage}",
                                    "deepspeed.bf16.enabled=false", "velora.targets=none",
                                    f"data.seq_len={args.seq_len}", f"deepspeed.train_batch_size={world}",
                                    "deepspeed.train_micro_batch_size_per_gpu=1"])
    seed_everything(0)
    model, _ = build_model(cfg)
    engine, _ = build_engine(model, cfg)
    for step in range(args.steps):
        ids = torch.randint(0, cfg.model.vocab_size, (1, args.seq_len),
                            generator=torch.Generator().manual_seed(step * world + rank))
        engine.backward(engine(ids, labels=ids))
        engine.step()
    optimizer = engine.optimizer.optimizer if stage else engine.optimizer
    projectors = [s["projector"] for s in optimizer.state.values() if "projector" in s]
    return state_bytes(optimizer.state), state_bytes(projectors)


def _worker(rank, world, stage, port, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        torch.save({name: _measure(args, name, stage, rank, world) for name in args.optimizers},
                   out / f"stage{stage}_rank{rank}.pt")
    finally:
        deepspeed.comm.destroy_process_group()


def measure_all(args, out: Path) -> dict:
    """{(optimizer, stage): [(state bytes, projector bytes) per rank]}."""
    found = {}
    for stage in args.stages:
        world = 1 if stage == 0 else args.world
        spawn_local(_worker, (world, stage, free_port(), args, out), nprocs=world)
        ranks = [torch.load(out / f"stage{stage}_rank{r}.pt") for r in range(world)]
        for name in args.optimizers:
            found[(name, stage)] = [r[name] for r in ranks]
    return found


def report(found: dict, args) -> list[str]:
    """The Markdown table and the goal lines."""
    lines = ["| optimizer | ZeRO | processes | state per rank (bytes) | largest rank MiB | of which projectors MiB "
             "| / AdamW at the same ZeRO |", "|---|---:|---:|---|---:|---:|---:|"]
    largest = {key: max(b for b, _ in ranks) for key, ranks in found.items()}
    for (name, stage), ranks in found.items():
        adamw = largest.get(("adamw", stage))
        lines.append(f"| {name} | {stage} | {len(ranks)} | {' / '.join(f'{b:,}' for b, _ in ranks)} | "
                     f"{largest[(name, stage)] / MIB:.2f} | {max(p for _, p in ranks) / MIB:.2f} | "
                     + (f"{largest[(name, stage)] / adamw:.4f} |" if adamw else "- |"))
    if {("adamw", 2), ("adafactor", 2)} <= set(found):
        ratio = largest[("adafactor", 2)] / largest[("adamw", 2)]
        lines.append(f"\nAdafactor at ZeRO 2 / AdamW at ZeRO 2 (largest rank): {ratio:.4f} "
                     f"(goal < 0.05: {'met' if ratio < 0.05 else 'missed'})")
    if {("galore_adamw", 0), ("galore_adamw", 2)} <= set(found):
        projectors = sum(p for _, p in found[("galore_adamw", 2)])
        bound = largest[("galore_adamw", 0)] / args.world + projectors
        lines.append(f"GaLore AdamW at ZeRO 2, largest rank: {largest[('galore_adamw', 2)]:,} bytes; ZeRO 0 state / "
                     f"{args.world} + projectors: {bound:,.0f} bytes (goal: below it: "
                     f"{'met' if largest[('galore_adamw', 2)] < bound else 'missed'})")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/llama_60m.json")
    p.add_argument("--optimizers", nargs="+", default=["adamw", "adafactor", "galore_adamw"])
    p.add_argument("--world", type=int, default=2, help="processes for the ZeRO >= 1 layouts")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 2], choices=[0, 1, 2, 3])
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None, help="where the ranks leave their numbers (default: a temporary dir)")
    args = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        found = measure_all(args, Path(args.out or tmp))
    print(f"config {args.config}, fp32, {args.steps} steps, batch 1 x {args.seq_len} per rank")
    print("\n".join(report(found, args)))


if __name__ == "__main__":
    main()
