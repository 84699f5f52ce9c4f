"""The timed sections of the GPU check, on DeepSpeed's bf16 engine exactly as train_c4.py builds it (bf16
weights, fp32 master weights and optimizer state), fed random token ids: memory per method, interleaved
step time against full-rank, the largest micro-batch, and a profiler top-10 of one step."""
from __future__ import annotations

import gc
import statistics
import time

import torch

from training.build import build_engine, build_model, seed_everything
from training.metrics import flops_per_token, peak_flops
from velora.memory import measure_step, saved_bytes

from .methods import Size, planned_peak
from .report import one_line

GIB, MIB = 2**30, 2**20


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg):
    """The DeepSpeed engine of `cfg`, as train_c4.py builds it (seeded weights, VeLoRA applied)."""
    seed_everything(cfg.train.seed)
    model, _ = build_model(cfg)
    return build_engine(model, cfg)[0]


def drop(engine) -> None:
    """Remove DeepSpeed's hooks and buffers of an engine; its memory returns once the caller lets go of it
    (then free())."""
    getattr(engine, "destroy", lambda: None)()


def ids_for(cfg, micro_batch: int, device: torch.device) -> torch.Tensor:
    return torch.randint(cfg.model.vocab_size, (micro_batch, cfg.data.seq_len), device=device)


def step(engine, ids) -> None:
    """One optimizer step through the engine (labels = inputs)."""
    loss = engine(ids, labels=ids)
    engine.backward(loss)
    engine.step()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def gib(n) -> float | None:
    return None if n is None else n / GIB


def memory_row(size: Size, sets, device: torch.device) -> dict:
    """Peak allocated of a steady-state step, the bytes it saves for backward on this device, the CPU
    accounting's count (velora/memory.py: the same model in bf16 on the CPU) and the planner's peak."""
    cfg, micro = size.run_config(sets), size.micro_batch
    free(device)
    engine = build(cfg)
    ids = ids_for(cfg, micro, device)
    for _ in range(2):                         # optimizer state allocated, VeLoRA's v set
        step(engine, ids)
    sync(device)
    persistent = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    saved = sum(saved_bytes(engine.module, lambda: engine(ids, labels=ids)).values())
    free(device)
    step(engine, ids)
    sync(device)
    peak = peak_gib(device)
    drop(engine)
    engine = None
    model, _ = build_model(cfg)
    cpu = measure_step(model.to(torch.bfloat16), ids.cpu())["saved_total"]
    return {"peak_alloc_gib": peak, "persistent_gib": gib(persistent), "saved_mib": saved / MIB,
            "saved_cpu_accounting_mib": cpu / MIB, "saved_ratio": saved / cpu if cpu else None,
            "planned_peak_gib": gib(planned_peak(cfg, micro))}


def timed(run, device: torch.device):
    """Run `run()` and return a callable giving its milliseconds (CUDA events on a GPU: read after a sync)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        return lambda: start.elapsed_time(end)
    t0 = time.perf_counter()
    run()
    ms = (time.perf_counter() - t0) * 1e3
    return lambda: ms


def interleaved(base, variant, rounds: int, device: torch.device) -> tuple[list, list]:
    """Step times (ms) of two step functions, alternating base / variant for `rounds` rounds."""
    pairs = [(timed(base, device), timed(variant, device)) for _ in range(rounds)]
    sync(device)
    return [b() for b, _ in pairs], [v() for _, v in pairs]


def speed_row(cfg, engine_base, ids, variant_engine, rounds: int, warmup: int, device) -> dict:
    """One variant against the full-rank engine: median ms of each and the median per-round ratio."""
    run_b, run_v = (lambda: step(engine_base, ids)), (lambda: step(variant_engine, ids))
    for _ in range(warmup):
        run_v()
    sync(device)
    tb, tv = interleaved(run_b, run_v, rounds, device)
    ms = statistics.median(tv)
    tokens_per_s = ids.numel() / (ms / 1e3)
    peak, _ = peak_flops(device, bf16=True)
    mfu = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s / peak if peak else None
    return {"step_ms": ms, "full_rank_ms": statistics.median(tb),
            "ratio_vs_full_rank": statistics.median(v / b for b, v in zip(tb, tv)), "tokens_per_s": tokens_per_s,
            "mfu": mfu, "rounds": rounds}


def speed_size(record, budget, device, size: Size, runs, opts: dict, save) -> None:
    """Interleaved step times of every (method, variant, overrides) in `runs` at one model size, each
    against one full-rank engine kept alive beside it (two engines in memory at a time)."""
    micro = size.micro_batch
    base_cfg = size.run_config()
    free(device)
    base = build(base_cfg)
    ids = ids_for(base_cfg, micro, device)
    for _ in range(opts["warmup"]):
        step(base, ids)
    last = 0.0
    for method, variant, sets in runs:
        row = {"size": size.name, "method": method, "codecs": variant or "-", "micro_batch": micro}
        record["rows"].append(row)
        if budget.spent(1.5 * last):
            row.update(status="skipped", note="time budget spent")
            continue
        t0, engine = time.perf_counter(), None
        try:
            engine = base if not sets else build(size.run_config(sets))
            row.update(status="ok", **speed_row(base_cfg, base, ids, engine, opts["rounds"], opts["warmup"], device))
        except Exception as e:
            row.update(status="OOM" if is_oom(e) else "error", note=one_line(e))
        if engine is not None and engine is not base:
            drop(engine)
        engine = None
        free(device)
        last = time.perf_counter() - t0
        save()
    drop(base)


def largest_fitting(probe, start: int, limit: int, granularity: int, budget_s: float) -> dict:
    """Double from `start` until probe(batch) returns None (OOM) or `limit`, then bisect down to
    `granularity`. probe returns the peak memory of a batch that fits. Stops when over budget."""
    t0 = time.perf_counter()
    over = lambda: time.perf_counter() - t0 > budget_s  # noqa: E731
    good, bad, peak, probes = None, None, None, []
    b = start
    while b <= limit and not over():
        p = probe(b)
        probes.append([b, p is not None])
        if p is None:
            bad = b
            break
        good, peak = b, p
        b = min(2 * b, limit) if b < limit else limit + 1
    if good is None and bad is not None:  # even `start` does not fit: search below it
        good, b = 0, bad
    while bad is not None and bad - good > granularity and not over():
        mid = (good + bad) // 2
        p = probe(mid)
        probes.append([mid, p is not None])
        if p is None:
            bad = mid
        else:
            good, peak = mid, p
    note = []
    if bad is None:
        note.append(f"search bound {limit} reached")
    elif bad - (good or 0) > granularity:
        note.append("time budget reached before the bisection converged")
    return {"largest_fit": good or None, "first_oom": bad, "peak_alloc_gib": peak, "probes": probes,
            "note": "; ".join(note)}


def max_batch_row(size: Size, sets, limit: int, granularity: int, budget_s: float, device) -> dict:
    """The largest micro-batch with one full training step in memory, on one engine whose optimizer
    state a first step at `start` allocated; after an OOM the engine is rebuilt if it no longer steps."""
    start = size.micro_batch
    cfg = size.run_config(sets)
    state = {"engine": build(cfg), "dirty": False}

    def probe(b: int):
        for attempt in range(2):
            free(device)
            try:
                step(state["engine"], ids_for(cfg, b, device))
                sync(device)
                state["dirty"] = False
                return peak_gib(device) or 0.0
            except Exception as e:
                if is_oom(e):
                    state["dirty"] = True
                    return None
                if not state["dirty"] or attempt:
                    raise
                drop(state["engine"])
                state["engine"] = None
                free(device)
                state["engine"], state["dirty"] = build(cfg), False
        return None

    try:
        result = largest_fitting(probe, start, limit, granularity, budget_s)
    finally:
        drop(state.pop("engine"))
    fit = result["largest_fit"]
    result["planned_peak_gib"] = gib(planned_peak(cfg, fit)) if fit else None
    result["probes"] = len(result["probes"])
    return result


def profile_rows(size: Size, sets, device, top: int = 10) -> tuple[list[dict], int | None]:
    """The `top` GPU kernels of one steady-state step by time (aten ops by self CPU time on a CPU), their
    share of the step's total, and the number of GPU kernels the step launched (None on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = size.run_config(sets)
    free(device)
    engine = build(cfg)
    ids = ids_for(cfg, size.micro_batch, device)
    for _ in range(2):
        step(engine, ids)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(engine, ids)
        sync(device)
    drop(engine)
    events = list(prof.key_averages())
    if device.type == "cuda":   # the kernels themselves (their launching aten ops would count them twice)
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    else:
        key = "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = [{"op": e.key[:80], "calls": e.count, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
            for e in ranked]
    kernels = sum(e.count for e in events) if device.type == "cuda" else None
    return rows, kernels
