"""The largest micro-batch that fits a GPU, per method: few planner runs, since every phase's peak is
affine in the micro-batch (activations and temporaries grow with it, weights and state do not)."""
from __future__ import annotations

from .cuda import FIT_MARGIN, fits
from .plan import plan_memory

GIB = 2 ** 30
MAX_MICRO_BATCH = 4096


def largest_micro_batch(plan_at, gpu_bytes: int, limit: int = MAX_MICRO_BATCH) -> int:
    """The largest b in [1, limit] with fits(plan_at(b), gpu_bytes), 0 when even b = 1 does not fit.
    `plan_at(b)` returns plan_memory's dict (callers cache it: several GPU sizes share the runs).

    Each phase's peak is affine in b (exactly, before the allocator's 512-byte rounding): the phases at
    b = 1 and 2 give the answer, which one more run confirms; should it not fit, bisection finds it."""
    if not fits(plan_at(1), gpu_bytes):
        return 0
    one, two = plan_at(1), plan_at(2)
    extra = one["cuda"]["device_bytes"] - max(p["cuda_bytes"] for p in one["phases"])
    budget = gpu_bytes * (1 - FIT_MARGIN) - extra
    guess = limit
    for p1, p2 in zip(one["phases"], two["phases"]):
        slope = p2["cuda_bytes"] - p1["cuda_bytes"]
        if slope > 0:
            guess = min(guess, 1 + int((budget - p1["cuda_bytes"]) // slope))
    lo, hi = 1, limit + 1
    b = max(guess, 1)
    while hi - lo > 1:
        if fits(plan_at(b), gpu_bytes):
            lo = b
            if b == guess:
                break
        else:
            hi = b
        b = (lo + hi) // 2
    return lo


def fit_table(config, methods: list, gpu_gbs: list, zero_stage: int, world_size: int, dtype: str,
              known: dict | None = None) -> dict:
    """{method: {gpu_gb: largest micro-batch}} with one cache of planner runs per method; `known` holds
    runs already made, {(method, zero stage, micro-batch): plan}."""
    out = {}
    for method in methods:
        cache = {b: plan for (m, z, b), plan in (known or {}).items() if m == method and z == zero_stage}

        def plan_at(b, method=method, cache=cache):
            if b not in cache:
                cache[b] = plan_memory(config, method, b, zero_stage, world_size, dtype)
            return cache[b]
        out[method] = {gb: largest_micro_batch(plan_at, int(gb * GIB)) for gb in gpu_gbs}
    return out
