"""plan_memory: the peak memory of one training step of a run config under one method, and its parts.

The step runs under FakeTensorMode (step.py), DeepSpeed's ZeRO 1/2 buffers come from zero.py, and the
CUDA-only corrections are added separately (cuda.py), so `peak_bytes` is what a real CPU step of the
same ZeRO 0 set-up measures and `cuda.max_memory_allocated` what a GPU should report.
"""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, apply_overrides, config_from_dict, load_config
from common.errors import ConfigError, check_choice
from ..methods import METHODS
from . import DTYPES
from .cuda import cuda_corrections
from .step import simulate
from .zero import apply_zero, zero_settings


def method_config(run_config, method: str, micro_batch: int, zero_stage: int, world_size: int,
                  dtype: str) -> RunConfig:
    """The run config (a RunConfig or a path) with the planner's settings, then the method's overrides."""
    check_choice("--methods", method, METHODS)
    check_choice("--dtype", dtype, DTYPES)
    if not isinstance(micro_batch, int) or micro_batch < 1:
        raise ConfigError(f"--micro-batch: expected a positive integer, got {micro_batch!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"--world-size: expected a positive integer, got {world_size!r}")
    check_choice("--zero-stage", zero_stage, (0, 1, 2, 3))     # zero.py explains why 3 is refused
    sets = [f"deepspeed.zero_optimization.stage={zero_stage}", f"deepspeed.bf16.enabled={str(dtype == 'bf16').lower()}",
            f"deepspeed.train_micro_batch_size_per_gpu={micro_batch}",
            f"deepspeed.train_batch_size={micro_batch * world_size}", "deepspeed.gradient_accumulation_steps=1"]
    sets += METHODS[method].overrides()
    if isinstance(run_config, (str, Path)):
        return load_config(run_config, sets)
    return config_from_dict(apply_overrides(run_config.to_dict(), sets), run_config.source)


def plan_memory(run_config, method: str, micro_batch: int, zero_stage: int, world_size: int, dtype: str,
                *, fake: bool = True) -> dict:
    """See plan_with_traces, which returns this dict beside the phases' traces."""
    return plan_with_traces(run_config, method, micro_batch, zero_stage, world_size, dtype, fake=fake)[0]


def plan_with_traces(run_config, method: str, micro_batch: int, zero_stage: int, world_size: int, dtype: str,
                     *, fake: bool = True) -> tuple[dict, list]:
    """Predict one training step's memory per GPU (`fake=False`: the same step on real CPU tensors, the
    planner's own check). Returns a JSON-ready dict: `peak_bytes` (the largest
    phase peak, as a CPU step counts it), `parts` (bytes by part at that peak), `peak_phase`, `host_bytes`
    (ZeRO-Offload's share in host memory), `saved_activations_total` (bytes the forward saves for
    backward, velora.memory's count), `phases` and `cuda` (the GPU prediction and its corrections).
    The traces, one per phase, are what fit.py extrapolates: {"raw": live bytes after each allocation,
    "live": live storages then, "ops": the op that made it, "extra": what ZeRO's formulas and the CUDA
    rounding add to the phase's peak}."""
    cfg = method_config(run_config, method, micro_batch, zero_stage, world_size, dtype)
    zs = zero_settings(cfg.deepspeed)
    sim_cfg = config_from_dict(apply_overrides(cfg.to_dict(), ["deepspeed.zero_optimization.stage=0"]), cfg.source)
    sim = simulate(sim_cfg, micro_batch, cfg.bf16, fake)
    elsize = sim["param_elsize"]
    phases, traces = [], []
    for ph in sim["phases"]:
        grads = max(p["parts"]["gradients"] for p in sim["phases"])
        raw = apply_zero({**ph, "parts": ph["parts"]}, zs, world_size, sim["n_params"], elsize, grads)
        cud = apply_zero({**ph, "parts": ph["cuda_parts"]}, zs, world_size, sim["n_params"], elsize, grads)
        phases.append({"name": ph["name"], "peak_bytes": sum(raw["parts"].values()), "parts": raw["parts"],
                       "host": raw["host"], "cuda_bytes": sum(cud["parts"].values())})
        raw_bytes, _, live, ops = zip(*ph["trace"])
        traces.append({"raw": raw_bytes, "live": live, "ops": ops,
                       "extra": phases[-1]["cuda_bytes"] - ph["peak_cuda_bytes"]})
    top = max(reversed(phases), key=lambda p: p["peak_bytes"])       # a tie goes to the later phase
    cuda_peak = max(p["cuda_bytes"] for p in phases)
    return {
        "method": method, "label": METHODS[method].label, "config": cfg.source, "micro_batch": micro_batch,
        "seq_len": cfg.data.seq_len, "dtype": dtype, "zero_stage": zs["stage"], "world_size": world_size,
        "offload": zs["offload"], "parameters": sim["n_params"],
        "peak_bytes": top["peak_bytes"], "peak_phase": top["name"], "parts": top["parts"],
        "host_bytes": sum(max((p["host"].get(k, 0) for p in phases), default=0) for k in top["host"]),
        "saved_activations_total": sim["saved_total"],
        "phases": [{"name": p["name"], "peak_bytes": p["peak_bytes"], "cuda_bytes": p["cuda_bytes"]} for p in phases],
        "cuda": cuda_corrections(cuda_peak),
    }, traces
