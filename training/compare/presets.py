"""The comparison's settings (scripts/compare_galore.sh --preset NAME): each preset's config, common
overrides, methods and protocol defaults; command-line options override them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..methods import COMPARED

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
C4_SAMPLE = SHARED / "c4-sample" / "en"
SP_32K = SHARED / "tokenizers" / "sp-bpe-32k.model"
GALORE_LR = 0.01
# The paper's 60M sub-token sizes (M = 8 for hidden-wide inputs, 16 for down_proj): at small widths the
# paper's grouping (hidden / 64 groups) gives M = 1 or 2, which is nearly exact and shows nothing.
SMALL_VELORA = ["velora.sub_token_size=8", 'velora.sub_token_overrides={"down_proj":16}']


@dataclass
class Preset:
    """Defaults of one comparison setting; command-line options override them."""

    config: str
    sets: list
    methods: list
    tokens: int = 0                  # 0: the config's max_steps worth
    seeds: int = 1
    lr_sweep: bool = False
    lrs: dict = field(default_factory=dict)     # method -> lr (else GaLore's 0.01 or the config's optim.lr)
    galore: dict = field(default_factory=dict)  # rank / update_proj_gap (default hidden/4, min(200, steps/50)),
                                                # eps (default: optim.eps)
    jobs: int = 1
    evals: int = 4
    lr_points: int = 5               # initial points of each method's lr grid
    tune_seeds: int = 1              # seeds the lr sweep runs (never reported)
    scales: list = field(default_factory=list)  # full-rank's optim.matrix_lr_scale grid (empty: not swept)
    heldout_tokens: int = 10_000_000  # tokens of ../shared/c4-heldout scored per reported run


def _cpu_data() -> list:
    """The real C4 sample when this machine has it, else the built-in corpus (a fresh clone elsewhere)."""
    return ["data.source=local", f"data.path={C4_SAMPLE}"] if C4_SAMPLE.is_dir() else ["data.source=builtin"]


PRESETS = {
    "gpu": Preset("configs/llama_60m.json", [], list(COMPARED)),
    "quick": Preset("configs/llama_tiny.json", SMALL_VELORA + [
        "model.hidden_size=64", "model.intermediate_size=172", "model.num_attention_heads=4",
        "model.num_hidden_layers=2", "model.max_sequence_length=128", "data.seq_len=128", "data.val_tokens=16384",
        "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16"],
        ["full_rank", "full_rank_ckpt", "galore", "velora_paper", "velora_all", "sr2_all", "velora_all_galore",
         "velora_all_memopts"], tokens=300_000, jobs=2, heldout_tokens=16384),
    # The reproducible CPU comparison (issue 21): a 128-wide, 2-layer LLaMA on the real C4 sample, 1,200 steps
    # of 2,048 tokens (past the unigram plateau early: see results.md's regime block), warmup and clipping shared
    # by every method; lrs chosen on tuning seed 1000 and the tuning slice, full-rank over lr x matrix_lr_scale;
    # 7 methods reported at 5 seeds. Sized to finish in <= 3 h on 2 cores (docs/BENCHMARKS.md).
    "cpu": Preset("configs/llama_tiny.json", _cpu_data() + SMALL_VELORA + [
        "model.hidden_size=128", "model.intermediate_size=352", "model.num_attention_heads=4",
        "model.num_hidden_layers=2", "model.vocab_size=2048", "model.max_sequence_length=128", "data.seq_len=128",
        "data.val_tokens=65536", "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16",
        "optim.warmup_ratio=0.1", "deepspeed.gradient_clipping=1.0"],
        ["full_rank", "full_rank_split", "galore", "velora_paper", "velora_all", "sr2_all", "sr2_hybrid"],
        tokens=1200 * 16 * 128, seeds=5, lr_sweep=True, lr_points=3, tune_seeds=1, scales=[0.25, 0.5, 1.0],
        lrs={"full_rank": 0.004}, jobs=2, evals=24, heldout_tokens=10_000_000),
    # The official codes' setup (GaLore's torchrun_main.py and VeLoRA's script on LLaMA-20M): see
    # docs/BENCHMARKS.md for where our pipeline still differs.
    "official": Preset("configs/llama_20m.json", [
        "data.source=local", f"data.path={C4_SAMPLE}", f"data.tokenizer={SP_32K}", "data.packing=galore",
        "data.val_tokens=10000000", "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16",
        "deepspeed.bf16.enabled=false", "optim.weight_decay=0.0", "deepspeed.gradient_clipping=0.0",
        "optim.warmup_ratio=0.1", "optim.min_lr_ratio=0.1", "train.max_steps=300",
        'velora.sub_token_overrides={"v_proj":8,"down_proj":16}',
        # what update-by-update parity showed the official codes do (scripts/reference_parity.py, issue 21)
        "data.add_bos=true", "data.pad_id=0", "velora.coef_dtype=float16", "velora.grad_scale=1.5"],
        ["full_rank", "velora_paper", "galore"], lrs={"full_rank": 1e-3, "velora_paper": 1e-3, "galore": 1e-2},
        # eps: galore_torch's GaLoreAdamW default, which the official script leaves (both of its groups)
        galore={"rank": 64, "update_proj_gap": 50, "eps": 1e-6}, evals=6),
}
