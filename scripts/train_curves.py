"""Training loss of several runs side by side, averaged over windows of steps (a markdown table).

    python scripts/train_curves.py RUN_DIR [RUN_DIR ...] [--window 20]

Reads every step's `train/loss` from each run's TensorBoard events (train_log.jsonl keeps only every
`log_every`-th step, and a single step's loss is too noisy to compare runs by). Resumed runs are fine:
a step logged twice keeps its last value.
"""
import argparse
import statistics
import sys
from pathlib import Path


def step_losses(run_dir: Path) -> dict:
    """{step: train loss} from the TensorBoard events under run_dir/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"error: {run_dir}: no TensorBoard events under {run_dir / 'tensorboard'}")
    losses = {}
    for f in files:                      # one file per (re)start, in start order
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        losses.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return losses


def table(runs: list, window: int) -> str:
    """Rows: windows of steps; columns: the mean training loss of each run over that window."""
    curves = [step_losses(Path(r)) for r in runs]
    last = max(max(c) for c in curves)
    names = [Path(r).name for r in runs]
    if len(set(names)) < len(names):      # e.g. several runs/*/runs/full_rank: the whole path tells them apart
        names = [str(r) for r in runs]
    lines = ["| steps | " + " | ".join(names) + " |", "|---|" + "---:|" * len(runs)]
    for lo in range(1, last + 1, window):
        hi = min(last, lo + window - 1)
        cells = [statistics.fmean(v) if (v := [c[s] for s in range(lo, hi + 1) if s in c]) else None for c in curves]
        lines.append(f"| {lo}–{hi} | " + " | ".join("–" if x is None else f"{x:.3f}" for x in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run output directories (train.output_dir)")
    p.add_argument("--window", type=int, default=20, help="steps per row (default 20)")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error("--window must be positive")
    print(table(args.runs, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
