"""The largest micro-batch that fits a GPU, per method: few planner runs, since every phase's peak is
affine in the micro-batch (activations and temporaries grow with it, weights and state do not)."""
from __future__ import annotations

from .cuda import FIT_MARGIN, fits
from .plan import plan_memory

GIB = 2 ** 30
MAX_MICRO_BATCH = 4096


def largest_micro_batch(plan_at, gpu_bytes: int, limit: int = MAX_MICRO_BATCH) -> int:
    """The largest b in [1, limit] with fits(plan_at(b), gpu_bytes), 0 when even b = 1 does not fit.
    `plan_at(b)` returns plan_memory's dict (callers cache it: several GPU sizes share the runs). The
    affine model through b = 1 and 2 gives the first guess; bisection makes the answer exact anyway."""
    if not fits(plan_at(1), gpu_bytes):
        return 0
    one, two = (plan_at(b)["cuda"]["device_bytes"] for b in (1, 2))
    guess = 1 + int((gpu_bytes * (1 - FIT_MARGIN) - one) // max(two - one, 1))
    lo, hi, probes = 1, limit + 1, [guess, guess + 1]      # fits(lo); hi does not fit (or is past the limit)
    while hi - lo > 1:
        b = probes.pop(0) if probes else (lo + hi) // 2
        if not lo < b < hi:
            continue
        if fits(plan_at(b), gpu_bytes):
            lo = b
        else:
            hi = b
    return lo


def fit_table(config, methods: list, gpu_gbs: list, zero_stage: int, world_size: int, dtype: str) -> dict:
    """{method: {gpu_gb: largest micro-batch}} with one cache of planner runs per method."""
    out = {}
    for method in methods:
        cache = {}

        def plan_at(b, method=method, cache=cache):
            if b not in cache:
                cache[b] = plan_memory(config, method, b, zero_stage, world_size, dtype)
            return cache[b]
        out[method] = {gb: largest_micro_batch(plan_at, int(gb * GIB)) for gb in gpu_gbs}
    return out
