"""Perplexity of a checkpoint on C4 (or the built-in corpus, or local shards).

    python scripts/eval_ppl.py --checkpoint runs/llama_tiny/final --data builtin      # or: velora-eval ...
    python scripts/eval_ppl.py --checkpoint runs/llama_60m --data /data/c4/en --max-tokens 10000000 --json

--checkpoint: an exported final/ directory (preferred: safetensors), a run's output directory, or a
DeepSpeed checkpoint directory of any ZeRO stage and world size (consolidated on CPU).
--data: c4 (streamed from the Hub), builtin, a directory of C4 shards, or one .json.gz/.jsonl file.
Unset options take the run's own settings, so the numbers equal the in-training evaluation's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from data import DataError

from .. import cli


def parse_args(argv):
    p = argparse.ArgumentParser(prog=cli.prog(), description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="final/, a run output directory or a DeepSpeed checkpoint")
    p.add_argument("--data", required=True, help="c4 | builtin | a directory of C4 shards | a .json.gz/.jsonl file")
    p.add_argument("--split", default="validation", choices=["validation", "all"],
                   help="validation: the fixed validation slice (data.val_tokens long); all: every document of a "
                        "--data file held out from training altogether (e.g. ../shared/c4-heldout's), up to "
                        "--max-tokens")
    p.add_argument("--skip-tokens", type=int,
                   help="start the slice after this many tokens (default: the run's data.val_skip_tokens)")
    p.add_argument("--max-tokens", type=int, help="tokens in the validation slice (default: the run's data.val_tokens)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's evaluation batch)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's data.seq_len)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a DeepSpeed checkpoint without checking its pickles first (only for trusted ones)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="evaluate weights that hold inf or NaN (refused by default: the run diverged)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(argv) -> int:
    args = parse_args(argv)
    if args.skip_tokens is not None and args.skip_tokens < 0:
        raise DataError(f"--skip-tokens: must be >= 0, got {args.skip_tokens}")
    for name in ("max_tokens", "batch_size", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise DataError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    from ..evaluate import evaluate_checkpoint

    # Libraries' notes go to stderr, so stdout holds only our report (one JSON object with --json).
    with contextlib.redirect_stdout(sys.stderr):
        result, used = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, skip_tokens=args.skip_tokens,
                                           max_tokens=args.max_tokens, seq_len=args.seq_len,
                                           batch_size=args.batch_size, device=args.device,
                                           trust=args.trust_checkpoint, allow_nonfinite=args.allow_nonfinite)
    if args.json:
        print(json.dumps({**result, "config": used}))
        return 0
    print(f"checkpoint: {used['checkpoint']} ({used['format']})")
    print("config: " + ", ".join(f"{k}={v}" for k, v in used.items() if k not in ("checkpoint", "format")))
    print(f"tokens evaluated: {result['tokens']:,} in {result['batches']} batches")
    print(f"loss: {result['loss']:.4f}")
    print(f"perplexity (token-weighted): {result['ppl']:.3f}")
    print(f"perplexity (GaLore-compatible: exp(sum of batch losses / (batches + 1))): {result['galore_ppl']:.3f}")
    return 0


def main(argv=None) -> int:
    """The `velora-eval` / `scripts/eval_ppl.py` command."""
    return cli.run(run, cli.prog(), argv)
