"""The methods, in one registry: what the comparison (scripts/compare_galore.py) trains, the memory planner
(scripts/plan_memory.py) predicts and the benchmarks run. Each is a list of config overrides on top of the
run config, the very ones train_c4.py is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    """One method. `galore`: trains with GaLore AdamW (the comparison adds its rank, gap and scale);
    `centre`: the comparison's lr-sweep centre (else the AdamW or GaLore default); `reference`: the full-rank
    method with the same lr recipe, paired against in the comparison's report; `compared`: whether the
    comparison offers it (the planner-only ones are memory options it trains only together)."""

    label: str
    sets: list = field(default_factory=list)
    galore: bool = False
    centre: float | None = None
    reference: str = "full_rank"
    compared: bool = True

    def overrides(self) -> list:
        """The method's overrides on their own, GaLore's optimizer named (the planner's and benchmarks' view)."""
        return (["optim.name=galore_adamw"] if self.galore else []) + list(self.sets)


ALL = "velora.targets=all"
SR2 = [ALL, "velora.codec=sr2"]
HYBRID = "velora.setting=sr2_hybrid"   # sr2 for q/k/v + gate/up, VeLoRA down_proj (velora/config.py's setting)
CHUNK, SWIGLU = "model.loss_chunk_size=1024", "model.recompute_swiglu=true"
SPLIT = "optim.matrix_lr_scale=0.25"
# ZeRO-Offload needs ZeRO 1 or 2; DeepSpeed refuses a client torch optimizer with offload unless told.
OFFLOAD = ["deepspeed.zero_optimization.stage=2", 'deepspeed.zero_optimization.offload_optimizer={"device":"cpu"}',
           "deepspeed.zero_force_ds_cpu_optimizer=false"]

METHODS = {
    "full_rank": Method("full-rank AdamW"),
    # GaLore's lr split without its projection: tells what GaLore gains from the split from what it gains from
    # projecting (its recipe gives the attention/MLP matrices 0.25 x the lr of everything else)
    "full_rank_split": Method("full-rank AdamW, matrices at 0.25 x lr (GaLore's split, no projection)", [SPLIT],
                              centre=0.01),
    "full_rank_ckpt": Method("full-rank AdamW + activation checkpointing", ["model.activation_checkpointing=true"]),
    "galore": Method("GaLore AdamW", galore=True),
    "velora_paper": Method("VeLoRA paper (v_proj+down_proj)", ["velora.targets=paper"]),
    "velora_all": Method("VeLoRA all", [ALL]),
    "sr2_all": Method("sr2 all (2-bit stochastic rounding)", SR2),
    "sr4_all": Method("sr4 all", [ALL, "velora.codec=sr4"]),
    "sr8_all": Method("sr8 all", [ALL, "velora.codec=sr8"]),
    "rademacher_all": Method("random ±1 sub-token basis, all", [ALL, "velora.codec=rademacher"]),
    "gaussian_all": Method("random Gaussian sub-token basis, all", [ALL, "velora.codec=gaussian"]),
    "pca_all": Method("principal directions + random residual, all", [ALL, "velora.codec=pca"]),
    # The codecs under GaLore's lr split: the fair test against full_rank_split, the best full-rank recipe here
    "sr2_all_split": Method("sr2 all, matrices at 0.25 x lr", SR2 + [SPLIT], centre=0.01, reference="full_rank_split"),
    "velora_all_split": Method("VeLoRA all, matrices at 0.25 x lr", [ALL, SPLIT], centre=0.01,
                               reference="full_rank_split"),
    "sr2_hybrid": Method("sr2 for q/k/v + gate/up, VeLoRA down_proj", [HYBRID]),
    "velora_all_galore": Method("VeLoRA all + GaLore AdamW", [ALL], galore=True),
    "velora_all_memopts": Method("VeLoRA all + loss_chunk_size + recompute_swiglu", [ALL, CHUNK, SWIGLU]),
    "sr2_all_memopts": Method("sr2 all + loss_chunk_size + recompute_swiglu", SR2 + [CHUNK, SWIGLU]),
    # The cheaper alternatives (issue 22): an 8-bit optimizer state, the optimizer offloaded by DeepSpeed
    "adamw8bit": Method("8-bit AdamW (bitsandbytes)", ["optim.name=adamw8bit"]),
    "zero_offload": Method("AdamW, optimizer state offloaded to the CPU (ZeRO-Offload, ZeRO 2)", OFFLOAD),
    "adamw8bit_sr2_all": Method("8-bit AdamW + sr2 all", ["optim.name=adamw8bit"] + SR2),
    "galore_sr2_all": Method("GaLore AdamW + sr2 all", SR2, galore=True),
    "sr2_hybrid_memopts": Method("sr2 for q/k/v + gate/up, VeLoRA down_proj + loss_chunk_size + recompute_swiglu",
                                 [HYBRID, CHUNK, SWIGLU]),
    # The planner's memory options one at a time
    "sr2_all_chunk": Method("sr2 all + loss_chunk_size", SR2 + [CHUNK], compared=False),
    "sr2_all_swiglu": Method("sr2 all + recompute_swiglu", SR2 + [SWIGLU], compared=False),
}
COMPARED = [name for name, m in METHODS.items() if m.compared]
# The planner's methods, in its table's order: full-rank, the cheaper alternatives, GaLore, the codecs and
# their memory options, and the combinations issue 22 asks for.
PLANNED = ["full_rank", "full_rank_ckpt", "adamw8bit", "zero_offload", "galore", "velora_paper", "velora_all",
           "sr2_all", "sr2_all_chunk", "sr2_all_swiglu", "sr2_all_memopts", "galore_sr2_all", "adamw8bit_sr2_all"]
