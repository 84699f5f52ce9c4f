"""Our trainer against the official GaLore / VeLoRA codes, update by update (issue 21): the losses of
training/compare/parity.py's run beside the reference's (`../shared/reference/official-galore-20m/`).

    python scripts/reference_parity.py --reference ../shared/reference/official-galore-20m \\
        --method full_rank_adamw --updates 30

The last line is `max |loss - reference| over updates 1-N: X`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import cli
from ..compare.parity import METHODS, check_reference, reference_config, run_updates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path, help="the reference directory (its README describes it)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--updates", type=int, default=30, help="updates 1-N to compare (the reference has 301)")
    p.add_argument("--validate", action="store_true", help="score the validation documents after the updates")
    p.add_argument("--save", type=Path, metavar="FILE", help="write the final weights here (safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an override on top of the reference's setup (to test what matters)")
    return p.parse_args(argv)


def run(argv=None) -> None:
    args = parse_args(argv)
    run = check_reference(args.reference, args.method, args.updates)
    cfg = reference_config(args.reference, args.method, args.set)
    ref, t0 = run["train_loss"], time.perf_counter()
    print(f"{args.method}: {run['description']}; lr {run['lr']}; our trainer from the reference's initial weights "
          f"and batches", flush=True)
    print(f"{'update':>6} {'lr':>10} {'ours':>10} {'reference':>10} {'|diff|':>9} {'s':>6}", flush=True)

    def show(k, loss, lr):
        print(f"{k:>6} {lr:>10.3e} {loss:>10.6f} {ref[k - 1]:>10.6f} {abs(loss - ref[k - 1]):>9.2e} "
              f"{time.perf_counter() - t0:>6.0f}", flush=True)

    losses, val = run_updates(cfg, args.updates, args.validate, show, args.save)
    if val is not None:
        mean_of_means = val["galore_loss"] * (val["batches"] + 1) / val["batches"]
        print(f"validation after update {args.updates}: mean of batch means {mean_of_means:.6f} (reference "
              f"{run['eval_loss_mean_of_batch_means']:.6f}, |diff| {abs(mean_of_means - run['eval_loss_mean_of_batch_means']):.2e}); "
              f"the official figure {val['galore_loss']:.6f} (reference {run['eval_loss_official_figure']:.6f}); "
              f"token-weighted {val['loss']:.6f} over {val['tokens']} targets in {val['batches']} batches")
    worst = max(abs(a - b) for a, b in zip(losses, ref))
    print(f"max |loss - reference| over updates 1-{args.updates}: {worst:.6g}")


def main(argv=None) -> int:
    """The `scripts/reference_parity.py` command."""
    from ..distributed import shutdown

    try:
        return cli.run(run, cli.prog(), argv)
    finally:
        shutdown()
