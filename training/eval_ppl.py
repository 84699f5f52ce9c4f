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
import dataclasses
import json
import sys
from pathlib import Path

import torch

from data import DataError
from data.sources import DOCUMENT_SUFFIXES
from training import cli
from training.config import resolve_batch


def data_source(src: str) -> dict:
    """--data value -> the DataConfig fields it sets."""
    if src in ("c4", "builtin"):
        return {"source": src, "path": ""}
    path = Path(src)
    if path.is_dir() or (path.is_file() and path.name.endswith(DOCUMENT_SUFFIXES)):
        return {"source": "local", "path": str(path)}
    raise DataError(f"--data {src}: expected c4, builtin, a directory of C4 shards or a file of documents "
                    f"({', '.join(DOCUMENT_SUFFIXES)}), and no such file or directory exists")


def eval_batch_size(run_config) -> int:
    """The batch size the training run evaluated with: train.eval_batch_size, else the micro-batch
    (which the saved config holds once resolved for the run's world size)."""
    ds = run_config.deepspeed
    return (run_config.train.eval_batch_size or ds.get("train_micro_batch_size_per_gpu")
            or resolve_batch(ds, 1)[1])


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


def evaluate_checkpoint(argv) -> int:
    args = parse_args(argv)
    if args.skip_tokens is not None and args.skip_tokens < 0:
        raise DataError(f"--skip-tokens: must be >= 0, got {args.skip_tokens}")
    for name in ("max_tokens", "batch_size", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise DataError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    from data import validation_batches
    from training.evaluate import evaluate
    from training.hf import load_source, resolve_checkpoint

    # Libraries' notes go to stderr, so stdout holds only our report (one JSON object with --json).
    with contextlib.redirect_stdout(sys.stderr):
        src = resolve_checkpoint(args.checkpoint)
        model, run_config, tokenizer = load_source(src, device=args.device, trust=args.trust_checkpoint,
                                                   allow_nonfinite=args.allow_nonfinite)
        changes = data_source(args.data)
        if args.skip_tokens is not None:
            changes["val_skip_tokens"] = args.skip_tokens
        if args.max_tokens:
            changes["val_tokens"] = args.max_tokens
        if args.seq_len:
            if args.seq_len > run_config.model.max_sequence_length:
                raise DataError(f"--seq-len {args.seq_len}: longer than the model's max_sequence_length "
                                f"({run_config.model.max_sequence_length}); use at most that")
            changes["seq_len"] = args.seq_len
        data_cfg = dataclasses.replace(run_config.data, **changes)
        batch_size = args.batch_size or eval_batch_size(run_config)
        result = evaluate(model, validation_batches(data_cfg, tokenizer, batch_size, split=args.split))

    used = {"checkpoint": str(src.dir), "format": src.kind, "data": args.data, "split": args.split,
            "source": data_cfg.source, "path": data_cfg.path, "seq_len": data_cfg.seq_len,
            "packing": data_cfg.packing, "val_tokens": data_cfg.val_tokens, "skip_tokens": data_cfg.val_skip_tokens,
            "batch_size": batch_size,
            "device": args.device}
    if args.json:
        print(json.dumps({**result, "config": used}))
        return 0
    print(f"checkpoint: {src.dir} ({src.kind})")
    print("config: " + ", ".join(f"{k}={v}" for k, v in used.items() if k not in ("checkpoint", "format")))
    print(f"tokens evaluated: {result['tokens']:,} in {result['batches']} batches")
    print(f"loss: {result['loss']:.4f}")
    print(f"perplexity (token-weighted): {result['ppl']:.3f}")
    print(f"perplexity (GaLore-compatible: exp(sum of batch losses / (batches + 1))): {result['galore_ppl']:.3f}")
    return 0


def main(argv=None) -> int:
    """The `velora-eval` / `scripts/eval_ppl.py` command."""
    return cli.run(evaluate_checkpoint, cli.prog(), argv)
