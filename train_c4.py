"""Pre-train a LLaMA model on C4 (or the built-in corpus) with DeepSpeed ZeRO, optionally with VeLoRA.

    python train_c4.py --config configs/llama_tiny.json                  # one process
    deepspeed --num_gpus 8 train_c4.py --config configs/llama_350m.json  # or torchrun --nproc_per_node 8
    python train_c4.py --config CFG --set train.max_steps=200 --set optim.lr=1e-3 --resume auto

Writes under train.output_dir: run_config.json, tokenizer.model, train_log.jsonl, tensorboard/,
checkpoints/step_N/ + latest, and final/ (model.safetensors, config.json, tokenizer files). The last
line printed is the final validation perplexity. See training/state/layout.py.
"""
from __future__ import annotations

import argparse
import sys

from training import cli
from training.config import load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config JSON (configs/llama_*.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from checkpoints/latest (auto; starts fresh when there is none) or a checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="save a checkpoint and exit after this step (for job time limits; a resumed run already at "
                        "STEP trains nothing); continue with --resume auto")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="let DeepSpeed unpickle the --resume checkpoint without checking it first (only for "
                        "checkpoints whose origin you trust)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def train(argv) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)   # before torch or DeepSpeed is imported: errors come at once
    from training.distributed import shutdown
    from training.run import TrainingRun
    try:
        TrainingRun(cfg, args.resume, args.stop_at, args.local_rank, args.trust_checkpoint).fit()
    finally:
        shutdown()


def main(argv=None) -> int:
    return cli.run(train, prog=None, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
