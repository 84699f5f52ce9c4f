"""Export a checkpoint as a plain LLaMA that transformers loads (safetensors, config.json, tokenizer).

    python scripts/export_hf.py --checkpoint runs/llama_60m/checkpoints/step_5000 --out exported/llama_60m
    # or: velora-export --checkpoint ... --out ...
    # then: transformers.AutoModelForCausalLM.from_pretrained("exported/llama_60m")
"""
from __future__ import annotations

import argparse

from .. import cli


def export(argv) -> int:
    p = argparse.ArgumentParser(prog=cli.prog(), description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="final/, a run output directory or a DeepSpeed checkpoint")
    p.add_argument("--out", required=True, help="directory to write (must not exist, or hold an earlier export "
                                                "and --overwrite be given)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a DeepSpeed checkpoint without checking its pickles first (only for trusted ones)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export weights that hold inf or NaN (refused by default: the run diverged)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    import torch

    from training.hf import check_export_target, load_source, resolve_checkpoint, save_final

    check_export_target(args.out, args.overwrite)     # before the (slow) load
    src = resolve_checkpoint(args.checkpoint)
    model, run_config, _ = load_source(src, trust=args.trust_checkpoint, allow_nonfinite=args.allow_nonfinite)
    out = save_final(model, run_config, src.tokenizer_file, args.out, dtype=getattr(torch, args.dtype),
                     overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite)
    print(f"exported {src.dir} ({src.kind}) to {out}: model.safetensors ({args.dtype}), config.json, "
          f"tokenizer.model, run_config.json")
    return 0


def main(argv=None) -> int:
    """The `velora-export` / `scripts/export_hf.py` command."""
    return cli.run(export, cli.prog(), argv)
