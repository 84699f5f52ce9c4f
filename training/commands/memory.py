"""Bytes saved for backward in one training step of a run config's model, by category, deduplicated by
storage (velora/memory.py), with exact parameter, gradient and AdamW state bytes (training/plan/measure.py).

    python scripts/velora_memory.py --config configs/llama_60m.json --velora all --batch-size 1 --seq-len 256
    # or: velora-memory --config ...
    python scripts/velora_memory.py --config configs/llama_60m.json --velora all --loss-chunk-size 1024 --json
"""
from __future__ import annotations

import argparse
import json

from common.errors import ConfigError
from velora.config import TARGET_PRESETS

from .. import cli
from ..config import load_config
from ..plan import build_and_measure, format_report


def measure(argv) -> int:
    p = argparse.ArgumentParser(prog=cli.prog(), description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config JSON (or a bare GaLore model JSON)")
    p.add_argument("--velora", choices=list(TARGET_PRESETS), help="override velora.targets with a preset")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=0, help="default: the config's data.seq_len")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, fp32 weights")
    p.add_argument("--loss-chunk-size", type=int, help="set model.loss_chunk_size")
    p.add_argument("--recompute-swiglu", action="store_true", help="set model.recompute_swiglu")
    p.add_argument("--activation-checkpointing", action="store_true", help="set model.activation_checkpointing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    overrides = list(args.set)
    if args.velora:
        overrides.append(f"velora.targets={args.velora}")
    if args.loss_chunk_size is not None:
        overrides.append(f"model.loss_chunk_size={args.loss_chunk_size}")
    if args.recompute_swiglu:
        overrides.append("model.recompute_swiglu=true")
    if args.activation_checkpointing:
        overrides.append("model.activation_checkpointing=true")
    cfg = load_config(args.config, overrides)
    if args.batch_size <= 0 or args.seq_len < 0:
        raise ConfigError("--batch-size must be positive and --seq-len >= 0")
    seq_len = args.seq_len or cfg.data.seq_len
    report = build_and_measure(cfg.model, cfg.velora, args.batch_size, seq_len, args.dtype)
    report.update(config=args.config, velora=cfg.velora.targets, dtype=args.dtype, batch_size=args.batch_size,
                  seq_len=seq_len)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def main(argv=None) -> int:
    """The `velora-memory` / `scripts/velora_memory.py` command."""
    return cli.run(measure, cli.prog(), argv)
