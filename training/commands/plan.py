"""The `velora-plan` / `scripts/plan_memory.py` command: will a run fit, with which method, at which
micro-batch? Every number comes from a fake-tensor training step on CPU (nothing allocated).

    python scripts/plan_memory.py --config configs/llama_60m.json --methods full_rank,sr2_all --micro-batch 4 --json
    velora-plan --config configs/llama_350m.json --methods all --gpu-gb 24,40,80
    velora-plan --config configs/llama_60m.json configs/llama_1b.json --methods all --micro-batch 1 --gpu-gb 24,80 --markdown
"""
from __future__ import annotations

import argparse
import json
import math

from .. import cli
from common.errors import ConfigError
from ..methods import METHODS, PLANNED
from ..plan import DTYPES, fit_markdown, parts_table


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"{what} {text!r}: expected comma-separated non-negative integers, e.g. 1,4")
    return values


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{what} {text!r}: expected comma-separated positive numbers of GiB, e.g. 24,40,80")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(prog=cli.prog(), description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, nargs="+", help="run config JSON(s)")
    p.add_argument("--methods", default="full_rank", help="comma-separated, or 'all': " + ", ".join(PLANNED)
                   + " (or any other of: " + ", ".join(m for m in METHODS if m not in PLANNED) + ")")
    p.add_argument("--micro-batch", default="", help="micro-batch(es) per GPU, e.g. 1,4 (default: the config's)")
    p.add_argument("--zero-stage", default="", help="ZeRO stage(s) 0-2, e.g. 0,2 (default: the config's)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs (data-parallel ranks) sharing ZeRO's partitions")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 when the config's deepspeed.bf16 is enabled")
    p.add_argument("--gpu-gb", help="GPU memory in GiB (comma-separated): print the largest micro-batch that fits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--markdown", action="store_true", help="print the --gpu-gb fits as one Markdown table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(argv) -> int:
    args = parse_args(argv)
    methods = list(PLANNED) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)} (or 'all')")
    if args.markdown and not args.gpu_gb:
        raise ConfigError("--markdown prints the largest micro-batch per GPU size: add --gpu-gb, e.g. --gpu-gb 24,40,80")
    from ..plan import plan_config          # the training stack, imported after --help has had its chance
    stages = _ints(args.zero_stage, "--zero-stage") if args.zero_stage else None
    batches = _ints(args.micro_batch, "--micro-batch") if args.micro_batch else None
    gbs = _numbers(args.gpu_gb, "--gpu-gb") if args.gpu_gb else None
    results = [plan_config(path, methods, stages, batches, args.world_size, args.dtype, gbs) for path in args.config]
    if args.json:
        print(json.dumps(results[0][0] if len(results) == 1 else {"configs": [out for out, _ in results]}))
        return 0
    if args.markdown:
        print(fit_markdown([out for out, _ in results], methods))
        return 0
    for out, plans in results:
        print(f"PREDICTED (fake-tensor step on CPU): {out['config']}, seq {out['seq_len']}, {out['dtype']}, "
              f"world size {args.world_size}\n" + parts_table(plans))
        for z, table in out.get("largest_micro_batch", {}).items():
            print(f"\nlargest micro-batch that fits, ZeRO {z} (0 = not even 1):")
            for m, row in table.items():
                print(f"  {m:<20}" + "  ".join(f"{gb:g} GiB: {b}" for gb, b in row.items()))
    return 0


def main(argv=None) -> int:
    """The `velora-plan` / `scripts/plan_memory.py` command."""
    return cli.run(run, cli.prog(), argv)
