"""The largest micro-batch that fits a GPU, per method, from three planner runs.

Each allocation of a step makes the live bytes a sum of storage sizes, and each size is affine in the
micro-batch b (activations and temporaries grow with it, weights and state do not). So when the step
runs the same ops at every b, the whole trace (live bytes after each allocation, tracker.py) at b = 1 and
2 gives it at any b, and each phase's peak is the largest of those affine functions (convex in b, so
two phase peaks alone would not do). A third run, just past the largest answer, checks that the ops and
every point of the trace are what the extrapolation says; otherwise (a step whose ops change with b,
e.g. a chunked loss) the answer is searched with planner runs. The CUDA rounding adds 0 to 511 bytes per
live storage: an answer the two bounds disagree on is settled with runs too.
"""
from __future__ import annotations

import torch

from .cuda import FIT_MARGIN
from .plan import plan_with_traces

GIB = 2 ** 30
MAX_MICRO_BATCH = 4096
ROUNDING = 511             # the most the CUDA allocator's 512-byte blocks add to one storage


def largest_micro_batch(plan_at, gpu_bytes: int, limit: int = MAX_MICRO_BATCH, tried=(1, 2),
                        bracket: tuple | None = None) -> int:
    """The largest b in [1, limit] with fits(plan_at(b), gpu_bytes), 0 when even b = 1 does not fit, by
    planner runs: b fits and b + 1 does not (or b = limit). `plan_at(b)` returns plan_memory's dict
    (callers cache it); `tried` are micro-batches already run, `bracket` = (lo, hi) says lo fits and
    hi + 1 does not. Each next run is where the line through the two runs nearest the answer meets the
    budget (regula falsi on the device bytes, convex in b), then one past it; bisection when that stalls."""
    budget = gpu_bytes * (1 - FIT_MARGIN)
    device = {b: plan_at(b)["cuda"]["device_bytes"] for b in sorted({1, *tried})}
    lo, hi = bracket if bracket else (0, limit)
    hi, width = hi + 1, None
    while True:
        lo = max([lo] + [b for b, d in device.items() if d <= budget])
        hi = min([hi] + [b for b, d in device.items() if d > budget])
        if hi - lo <= 1:
            return lo
        stalled, width = width is not None and 2 * (hi - lo) > width, hi - lo
        below = sorted(b for b in device if b <= lo)[-2:]
        pair = (lo, hi) if hi in device and lo in device else tuple(below)
        b = (lo + hi) // 2
        if len(pair) == 2 and device[pair[1]] != device[pair[0]] and not stalled:
            b1, slope = pair[0], (device[pair[1]] - device[pair[0]]) / (pair[1] - pair[0])
            b = min(max(b1 + int((budget - device[b1]) // slope), lo + 1), hi - 1) if slope > 0 else hi - 1
        for step in (b, b + 1):
            if lo < step < hi and step not in device:
                device[step] = plan_at(step)["cuda"]["device_bytes"]


def _lines(one: list, two: list) -> list | None:
    """Per phase, (bytes at b = 1, bytes per extra micro-batch, live storages, extra) over the trace's
    points, from the traces at b = 1 and 2; None when the two runs' ops or storages differ."""
    out = []
    for t1, t2 in zip(one, two, strict=True):
        if t1["ops"] != t2["ops"] or t1["live"] != t2["live"] or t1["extra"] != t2["extra"]:
            return None
        raw1, raw2 = torch.tensor(t1["raw"], dtype=torch.int64), torch.tensor(t2["raw"], dtype=torch.int64)
        out.append((raw1, raw2 - raw1, torch.tensor(t1["live"], dtype=torch.int64), t1["extra"]))
    return out


def _model_answer(lines: list, budget: int, rounding: bool, limit: int) -> int:
    """The largest b in [1, limit] whose extrapolated points, each + ROUNDING per live storage when
    `rounding`, all stay within `budget` once the phase's extra is added; 0 if none."""
    best = limit
    for raw, slope, live, extra in lines:
        room = budget - extra - raw - (ROUNDING * live if rounding else 0)
        if bool(((room < 0) & (slope <= 0)).any()):
            return 0
        grow = slope > 0
        if grow.any():
            best = min(best, 1 + int(torch.div(room[grow], slope[grow], rounding_mode="floor").min()))
    return max(best, 0)


def _matches(lines: list, traces: list, b: int) -> bool:
    """Whether the run at `b` made the extrapolated bytes, storages and extras at every point of every phase."""
    for (raw, slope, live, extra), got in zip(lines, traces, strict=True):
        if len(got["raw"]) != len(raw) or got["extra"] != extra:
            return False
        if not (torch.equal(torch.tensor(got["live"]), live)
                and torch.equal(torch.tensor(got["raw"], dtype=torch.int64), raw + (b - 1) * slope)):
            return False
    return True


def fit_method(plan_at, traces: dict, gpu_bytes_list: list, limit: int = MAX_MICRO_BATCH) -> list[int]:
    """The largest micro-batch per GPU size for one method (see the module docstring). `plan_at(b)` runs
    the planner (cached) and fills `traces[b]`."""
    one = plan_at(1)
    overhead = one["cuda"]["device_bytes"] - max(p["cuda_bytes"] for p in one["phases"])
    plan_at(2)
    lines = _lines(traces[1], traces[2])
    if lines is not None:
        budgets = [int(g * (1 - FIT_MARGIN)) - overhead for g in gpu_bytes_list]
        bounds = [(_model_answer(lines, x, True, limit), _model_answer(lines, x, False, limit)) for x in budgets]
        check = max(hi for _, hi in bounds) + 1
        if check <= limit:
            plan_at(check)
        if check > limit or _matches(lines, traces[check], check):
            return [lo if lo == hi else largest_micro_batch(plan_at, g, limit, (), bracket=(lo, hi))
                    for (lo, hi), g in zip(bounds, gpu_bytes_list)]
    return [largest_micro_batch(plan_at, g, limit, tuple(traces)) for g in gpu_bytes_list]


def fit_table(config, methods: list, gpu_gbs: list, zero_stage: int, world_size: int, dtype: str,
              known: dict | None = None) -> dict:
    """{method: {gpu_gb: largest micro-batch}} with one cache of planner runs per method; `known` holds
    runs already made, {(method, zero stage, micro-batch): (plan, traces)}."""
    out = {}
    for method in methods:
        cache = {b: run for (m, z, b), run in (known or {}).items() if m == method and z == zero_stage}
        traces = {}

        def plan_at(b, method=method, cache=cache, traces=traces):
            if b not in cache:
                cache[b] = plan_with_traces(config, method, b, zero_stage, world_size, dtype)
            traces[b] = cache[b][1]
            return cache[b][0]
        answers = fit_method(plan_at, traces, [int(gb * GIB) for gb in gpu_gbs])
        out[method] = dict(zip(gpu_gbs, answers))
    return out
