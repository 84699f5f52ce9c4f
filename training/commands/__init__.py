"""The command-line entry points, one module per command, each a thin argparse parser over library functions
of the package that owns the concern; every one ends through `training.cli.run` (one-line user errors).

    eval     velora-eval    scripts/eval_ppl.py        perplexity of a checkpoint (training/evaluate.py)
    export   velora-export  scripts/export_hf.py       a checkpoint as a Hugging Face LLaMA (training/hf/export.py)
    memory   velora-memory  scripts/velora_memory.py   bytes saved for backward (training/plan/measure.py)
    plan     velora-plan    scripts/plan_memory.py     will it fit: the memory planner (training/plan/)
    compare                 scripts/compare_galore.sh  the methods against each other (training/compare/)
    parity                  scripts/reference_parity.py  our trainer against the official codes (compare/parity.py)

The training run itself is train_c4.py (`velora-train`) at the repository's root.
"""
