"""VeLoRA and the other activation codecs vs GaLore vs full-rank: every method as a full `train_c4.py` run on
the same model, data, token budget and seeds, then one table and one plot.

    scripts/compare_galore.sh --preset quick      # tiny model, built-in corpus: a few minutes on 2 CPU cores
    scripts/compare_galore.sh --preset cpu        # the reproducible CPU comparison: 5 seeds, lrs tuned (<= 3 h, 2 cores)
    scripts/compare_galore.sh --preset official   # the official GaLore/VeLoRA codes' 20M setup, as exactly as we can
    scripts/compare_galore.sh                     # llama_60m with GaLore's recipe (a GPU)
    scripts/compare_galore.sh --config CFG --tokens N --seeds 3 --lr-sweep --methods full_rank,sr2_all ...

Methods (`--methods` picks some; training/methods.py lists them all). `--seeds N` reports every method at seeds
0..N-1 (`train.seed`, `data.seed` and `velora.seed`: initial weights, data order and codec noise; the same
seed gives every method the same initial weights and batches). `--lr-sweep` chooses each method's lr on data
that is never reported: a log-spaced grid of `--lr-points` lrs a factor 2 apart around the method's default
runs at the tuning seeds (`--tune-seeds K`: seeds 1000..1000+K-1) and is scored on the tuning slice of
validation (its first `data.val_tokens` tokens); the grid is extended while the best mean loss sits at an
edge. The best lr then runs at the reported seeds, scored on the next `data.val_tokens` tokens
(`data.val_skip_tokens`), and once more, scoring only, on ../shared/c4-heldout when it is present.
`--matrix-lr-scales` also sweeps full-rank's `optim.matrix_lr_scale` (its matrices' lr / the lr of
embeddings, norms and head), so full-rank is tuned over both lrs as GaLore's recipe is; the AdamW methods
paired with full-rank then use full-rank's chosen scale. GaLore keeps its recipe's two parameter groups: one
lr for all, its projected matrices' updates scaled by 0.25; the sweep moves that one lr. Each run lives in
OUT/runs/<name>/ with its log OUT/logs/<name>.log; a run that completed with the same command line is
reused, so the script resumes and re-tabulates. Memory columns are measured here, in this process, from
real tensors. Writes OUT/results.csv, OUT/results.md and OUT/plot.png (training/compare/report.py). Exits non-zero
when a run failed for another reason than a diverged loss.
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

from .. import cli
from ..compare.presets import GALORE_LR, PRESETS
from ..compare.sweep import Plan, sweep, tabulate
from ..methods import COMPARED


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="gpu", help="the setting's defaults (see above)")
    p.add_argument("--quick", action="store_true", help="the same as --preset quick")
    p.add_argument("--config", help="run config (default: the preset's)")
    p.add_argument("--tokens", type=int, help="training tokens per run (default: the preset's, else max_steps worth)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 for every method (default: the preset's)")
    p.add_argument("--lr-sweep", action="store_true", default=None, help="sweep the lr per method (see above)")
    p.add_argument("--lr-points", type=int, help="initial points of the lr grid, factor 2 apart (default: the preset's)")
    p.add_argument("--tune-seeds", type=int, help="seeds the lr sweep runs, never reported (default: the preset's)")
    p.add_argument("--matrix-lr-scales", help="comma-separated initial grid of full-rank's optim.matrix_lr_scale "
                                              "(default: the preset's; none: not swept)")
    p.add_argument("--lr", type=float, help="lr (or the sweep's centre) of the AdamW methods")
    p.add_argument("--galore-lr", type=float,
                   help=f"lr (or the sweep's centre) of the GaLore methods and the *_split ones ({GALORE_LR})")
    p.add_argument("--out", help="output directory (default: runs/compare_<preset>)")
    p.add_argument("--methods", help="comma-separated subset of: " + ", ".join(COMPARED))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every method")
    p.add_argument("--method-set", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                   help="override for one method (e.g. galore:optim.galore_rank=64)")
    p.add_argument("--heldout-tokens", type=int, help="tokens of ../shared/c4-heldout scored per reported run "
                                                      "(default: the preset's; 0: none)")
    p.add_argument("--evals", type=int, help="validation evaluations per run (the loss curve's points)")
    p.add_argument("--jobs", type=int, help="runs at once, each with cores / jobs threads (one-thread runs side by "
                                            "side beat two-thread runs on a busy small CPU; step times are then "
                                            "measured under shared load)")
    p.add_argument("--measure-batch", type=int, default=8, help="batch of the in-process memory measurement "
                                                                "(scaled linearly to the micro-batch)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    return args


def compare(argv) -> int:
    args = parse_args(argv)
    args.argv = list(argv)
    plan = Plan(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    facts = plan.facts()
    print(f"compare_galore: {len(plan.methods)} method(s) x {len(plan.seeds)} seed(s)"
          f"{' x swept lrs' if plan.lr_sweep else ''}, {plan.steps} steps ({facts['tokens']:,} tokens) per run, "
          f"config {plan.config}, output {plan.out}", flush=True)
    jobs = max(1, args.jobs or plan.preset.jobs)
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)   # the cores this process may use (taskset, cgroups)
    facts.update(jobs=jobs, threads=threads)
    from ..compare.regime import train_split_stats
    facts.update(train_split_stats(plan.base))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = tabulate(plan, sweep(plan, pool, threads), pool, args.measure_batch)
    from ..compare.report import write_reports
    write_reports(rows, facts, plan.out)
    failed = sorted({r["name"] for r in rows if r["status"] == "failed" or "measure_error" in r})
    print(f"compare_galore: wrote {plan.out / 'results.csv'}, {plan.out / 'results.md'}, {plan.out / 'plot.png'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    return cli.run(compare, "compare_galore", argv)
