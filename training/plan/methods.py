"""The methods the planner knows: each is a list of config overrides on top of the run config (the same
overrides scripts/compare_galore.py's METHODS give train_c4.py; a test keeps the two in step)."""
from __future__ import annotations

DTYPES = ("bf16", "fp32")
ALL = ["velora.targets=all"]
SR2 = ALL + ["velora.codec=sr2"]
CHUNK, SWIGLU = ["model.loss_chunk_size=1024"], ["model.recompute_swiglu=true"]
GALORE, ADAMW8 = ["optim.name=galore_adamw"], ["optim.name=adamw8bit"]
# ZeRO-Offload needs ZeRO 1 or 2; DeepSpeed refuses a client torch optimizer with offload unless told.
OFFLOAD = ["deepspeed.zero_optimization.stage=2", 'deepspeed.zero_optimization.offload_optimizer={"device":"cpu"}',
           "deepspeed.zero_force_ds_cpu_optimizer=false"]

METHODS = {
    "full_rank": ("full-rank AdamW", []),
    "full_rank_ckpt": ("full-rank AdamW + activation checkpointing", ["model.activation_checkpointing=true"]),
    "adamw8bit": ("8-bit AdamW (bitsandbytes)", ADAMW8),
    "zero_offload": ("AdamW, optimizer state offloaded to the CPU (ZeRO-Offload, ZeRO 2)", OFFLOAD),
    "galore": ("GaLore AdamW", GALORE),
    "velora_paper": ("VeLoRA paper (v_proj+down_proj)", ["velora.targets=paper"]),
    "velora_all": ("VeLoRA all", ALL),
    "sr2_all": ("sr2 all (2-bit stochastic rounding)", SR2),
    "sr2_all_chunk": ("sr2 all + loss_chunk_size", SR2 + CHUNK),
    "sr2_all_swiglu": ("sr2 all + recompute_swiglu", SR2 + SWIGLU),
    "sr2_all_memopts": ("sr2 all + loss_chunk_size + recompute_swiglu", SR2 + CHUNK + SWIGLU),
    "galore_sr2_all": ("GaLore AdamW + sr2 all", GALORE + SR2),
    "adamw8bit_sr2_all": ("8-bit AdamW + sr2 all", ADAMW8 + SR2),
}
