"""DeepSpeed's own buffers per GPU, for ZeRO 1 and 2 and the optimizer offload, from the parts of a
simulated ZeRO 0 step (DeepSpeed 0.19.8; the file each rule follows is named).

ZeRO 0 needs no formula: the simulated step is what DeepSpeed does there. In bf16 with a client
optimizer DeepSpeed wraps it in `FP16_UnfusedOptimizer` (runtime/engine.py `_do_optimizer_sanity_check`
-> DDP_BFLOAT16; runtime/fp16/unfused_optimizer.py): an fp32 clone of every parameter is the master the
optimizer steps, each bf16 gradient is copied to an fp32 `.grad` of its master at step time and dropped
after. step.py runs exactly that.

ZeRO 1 and 2 (runtime/zero/stage_1_and_2.py, N = world size, P = parameters):
- the fp32 master is the rank's partition only (`single_partition_of_fp32_groups`): 4P/N bytes;
- its fp32 gradient (4P/N bytes) is made from the reduced low-precision partition at the step and
  dropped after (`step`); with offload it is allocated once and kept (`initialize_optimizer_states`);
- the optimizer steps that flat partition: its state is the ZeRO 0 state / N;
- gradients go through a reduce bucket of `reduce_bucket_size` elements (default 5e8), allocated in
  backward (`setup_buckets`): fp32 at ZeRO 1, the model's dtype at ZeRO 2, twice with `overlap_comm`
  (default off below ZeRO 3);
- ZeRO 1 keeps every low-precision gradient until the step; ZeRO 2 keeps only the rank's partition,
  contiguous (`grads_in_partition`, P/N elements of the model's dtype, allocated once and kept);
- at the step (without offload) the partition's gradients are flattened once more (P/N, model dtype)
  before the fp32 copy, and the optimizer steps one flat fp32 tensor, so its temporaries are partition
  sized: counted as one fp32 partition (AdamW's `exp_avg_sq.sqrt()`; an estimate for other optimizers).
With `offload_optimizer.device = cpu` the master, its gradient, the optimizer state and a bf16 copy of
the partition (`param_buffer_of_bit16_for_cpu_offload_groups`) live in host memory (`host_bytes`). ZeRO 3 is not modelled (the planner refuses it).
"""
from __future__ import annotations

from common.errors import ConfigError

DEFAULT_BUCKET = 500_000_000


def zero_settings(ds: dict) -> dict:
    """The ZeRO settings the formulas read, with DeepSpeed's defaults."""
    z = ds.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    if stage == 3:
        raise ConfigError("deepspeed.zero_optimization.stage=3: the planner models ZeRO 0-2; "
                          "plan with stage 2 (an upper bound of ZeRO 3's per-GPU state) or 0")
    offload = (z.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    if offload and stage == 0:
        raise ConfigError("deepspeed.zero_optimization.offload_optimizer needs ZeRO stage 1 or 2; set "
                          "deepspeed.zero_optimization.stage")
    return {"stage": stage, "offload": offload, "bucket": int(z.get("reduce_bucket_size", DEFAULT_BUCKET)),
            "overlap_comm": bool(z.get("overlap_comm", False))}


def apply_zero(phase: dict, zs: dict, world: int, n_params: int, model_elsize: int, grad_bytes: int) -> dict:
    """One phase's parts under ZeRO 1/2 (see the module docstring). `phase['parts']` are the simulated
    ZeRO 0 bytes; returns {"parts": GPU bytes by part, "host": host bytes by part}."""
    parts = dict(phase["parts"])
    if zs["stage"] == 0:
        return {"parts": parts, "host": {}}
    n, host = world, {}
    stepping = phase["name"].endswith("optimizer")
    parts["master_weights"] = 4 * n_params // n
    parts["master_gradients"] = 4 * n_params // n if stepping or zs["offload"] else 0
    parts["optimizer_state"] = parts.get("optimizer_state", 0) // n
    if zs["offload"]:
        for key in ("master_weights", "master_gradients", "optimizer_state"):
            host[key] = parts.pop(key)
        host["bf16_partition_buffer"] = model_elsize * n_params // n
    if zs["stage"] == 2:
        parts["gradients"] = grad_bytes // n
    if stepping and not zs["offload"]:
        parts["step_buffers"] = model_elsize * n_params // n + 4 * n_params // n
    if phase["name"].endswith("backward"):
        bucket_elsize = 4 if zs["stage"] == 1 else model_elsize
        parts["reduce_buckets"] = zs["bucket"] * bucket_elsize * (2 if zs["overlap_comm"] else 1)
    return {"parts": parts, "host": host}
