"""One-call GPU benchmark: memory, step time, tokens/s and MFU of every training setup we compare.

For llama_60m, llama_130m and llama_350m at GaLore's micro-batch and sequence length, in bf16, it
measures full-rank AdamW, activation checkpointing, VeLoRA `paper`, VeLoRA `all` (alone and with
the model's memory options), GaLore AdamW and VeLoRA `all` + GaLore; then the largest micro-batch
that fits at llama_350m, full-rank vs VeLoRA `all`. Written for a lent H200: every case has a
time budget, and the whole run keeps inside `--budget-s` (6.5 minutes) by skipping what is left.

    python scripts/bench_gpu.py                 # CUDA; table + JSON to --out, else $OUT, else cwd
    python scripts/bench_gpu.py --smoke         # every case on CPU with a tiny model, in seconds

It needs only torch and this repo's model/, velora/ and the two DeepSpeed-free modules of training/
it reuses (config, optim): the lent machine has no DeepSpeed and no datasets. galore_torch is used
when importable; without it the GaLore cases are skipped with a note. Data: random token ids.
bf16 here is torch autocast over fp32 parameters and fp32 AdamW states, not DeepSpeed's bf16
parameters with fp32 master weights: simpler, and the same for every case. Results are rewritten
after every case, so a run cut short still leaves its table.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from training.config import OptimConfig, load_config  # noqa: E402
from training.metrics import PEAK_TFLOPS, flops_per_token, peak_flops  # noqa: E402
from training.optim import galore_param_groups  # noqa: E402
from velora import VeLoRAConfig, apply_velora  # noqa: E402

MODELS = ("llama_60m", "llama_130m", "llama_350m")


@dataclass(frozen=True)
class Case:
    name: str
    velora: str = "none"                      # VeLoRA preset
    galore: bool = False
    activation_checkpointing: bool = False
    memory_options: bool = False              # the model's loss_chunk_size + recompute_swiglu


CASES = (
    Case("full-rank AdamW"),
    Case("activation checkpointing", activation_checkpointing=True),
    Case("VeLoRA paper", velora="paper"),
    Case("VeLoRA all", velora="all"),
    Case("VeLoRA all + memory options", velora="all", memory_options=True),
    Case("GaLore AdamW", galore=True),
    Case("VeLoRA all + GaLore", velora="all", galore=True),
)


@dataclass
class Setup:
    """One model size with the batch shape and optimizer settings of its run config."""
    name: str
    model: LlamaConfig
    optim: OptimConfig                        # lr and GaLore's rank / update_proj_gap / scale
    micro_batch: int
    seq_len: int
    loss_chunk: int = 4096                    # tokens per loss chunk when memory_options is on


def load_setup(name: str) -> Setup:
    cfg = load_config(REPO / "configs" / f"{name}.json")
    return Setup(name, cfg.model, cfg.optim, cfg.deepspeed["train_micro_batch_size_per_gpu"], cfg.data.seq_len)


SMOKE_SETUP = Setup("smoke-tiny", LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                              num_hidden_layers=2, vocab_size=256, max_sequence_length=32),
                    OptimConfig(lr=1e-3, galore_rank=8), micro_batch=4, seq_len=32, loss_chunk=32)


def load_galore_adamw():
    """GaLore's AdamW class and a note, or (None, why). galore_torch/__init__ also imports its 8-bit
    optimizer, which needs bitsandbytes (absent on the lent machine), so on ImportError load the
    package without its __init__ and take adamw.py alone."""
    try:
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW, ""
    except ImportError as e:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            return None, "galore_torch not importable (carry its wheel: docs/BENCHMARKS.md, H200)"
        first_error = e
    bare = types.ModuleType("galore_torch")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = bare
    try:
        from galore_torch.adamw import AdamW
    except ImportError as e:
        return None, f"galore_torch not importable ({e}; first {first_error})"
    return AdamW, f"galore_torch.adamw loaded without the package __init__ ({first_error})"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Bench:
    """Builds each case's model and optimizer on one device and times training steps."""

    def __init__(self, device: torch.device, steps: int, warmup: int, case_budget_s: float, galore_cls):
        self.device, self.steps, self.warmup = device, steps, warmup
        self.case_budget_s, self.galore_cls = case_budget_s, galore_cls
        # training.metrics' dense bf16 peak of this GPU (the run's own MFU uses the same table); a CPU
        # smoke run is reported against the H200's, a placeholder
        self.peak, self.peak_label = peak_flops(device, bf16=True)
        if self.peak is None:
            self.peak = PEAK_TFLOPS[0][1] * 1e12
            self.peak_label = f"{PEAK_TFLOPS[0][1]:g} TFLOP/s ({PEAK_TFLOPS[0][0]}'s dense bf16 peak; a CPU smoke run)"

    def build(self, setup: Setup, case: Case):
        """Model (+ VeLoRA) and optimizer for one case, on the device, with what VeLoRA replaced."""
        memory = {"loss_chunk_size": setup.loss_chunk, "recompute_swiglu": True} if case.memory_options else {}
        cfg = dataclasses.replace(setup.model, activation_checkpointing=case.activation_checkpointing, **memory)
        torch.manual_seed(0)
        with torch.device(self.device):
            model = LlamaForCausalLM(cfg)
        info = {}
        if case.velora != "none":
            model, summary = apply_velora(model, VeLoRAConfig(targets=case.velora))
            info = {"velora_modules": len(summary.modules), "velora_warnings": summary.warnings}
        if case.galore:
            opt = self.galore_cls(galore_param_groups(model, setup.optim), lr=setup.optim.lr,
                                  no_deprecation_warning=True)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=setup.optim.lr)
        return model, opt, cfg, info

    def step(self, model, opt, ids) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_steps(self, run, n: int) -> list[float]:
        """Milliseconds of each of n steps: CUDA events on a GPU, perf_counter on CPU."""
        if self.device.type != "cuda":
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    def measure(self, setup: Setup, case: Case, batch: int) -> dict:
        """One case at one micro-batch: warm-up (VeLoRA's v init, GaLore's first SVD), then the
        timed steps; peak memory covers everything since the model was built."""
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model, opt, cfg, info = self.build(setup, case)
        notes = [f"{info['velora_modules']} VeLoRA modules"] if info else []
        if info.get("velora_warnings"):
            notes.append(f"{len(info['velora_warnings'])} VeLoRA warning(s), in the JSON")
        ids = torch.randint(cfg.vocab_size, (batch, setup.seq_len), device=self.device)
        run = lambda: self.step(model, opt, ids)  # noqa: E731
        t0 = time.perf_counter()
        for _ in range(self.warmup):
            t_step = time.perf_counter()
            run()
            self.sync()
        per_step = time.perf_counter() - t_step
        n = self.steps
        left = self.case_budget_s - (time.perf_counter() - t0)
        if per_step * n > left:
            n = max(2, int(left / per_step))
            notes.append(f"only {n} timed steps (case time budget)")
        ms = statistics.median(self.timed_steps(run, n))
        tokens_per_s = batch * setup.seq_len / (ms / 1e3)
        tflops = flops_per_token(cfg, setup.seq_len) * tokens_per_s / 1e12
        mem = {}
        if self.device.type == "cuda":
            mem = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        return {"status": "ok", "micro_batch": batch, "timed_steps": n, "step_ms": ms,
                "tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops * 1e12 / self.peak,
                **mem, **info, "note": "; ".join(notes)}

    def run_case(self, setup: Setup, case: Case) -> dict:
        """measure() at the config's micro-batch, halving it on OOM; other errors are recorded."""
        if case.galore and self.galore_cls is None:
            return {"status": "skipped", "note": "galore_torch not importable"}
        batch, started = setup.micro_batch, time.perf_counter()
        while True:
            try:
                result = self.measure(setup, case, batch)
                if batch != setup.micro_batch:
                    result["note"] = "; ".join(filter(None, [
                        f"micro-batch reduced {setup.micro_batch} -> {batch} (OOM)", result["note"]]))
                return result
            except Exception as e:  # one broken case must not cost the rest of a 15-minute lease
                if not is_oom(e):
                    return {"status": "error", "note": one_line(e)}
            free_memory(self.device)
            if batch == 1 or time.perf_counter() - started > self.case_budget_s:
                return {"status": "OOM", "note": f"out of memory down to micro-batch {batch}"}
            batch //= 2

    def fits(self, model, opt, vocab: int, seq_len: int, batch: int) -> float | None:
        """Peak allocated GiB of one step at this micro-batch (0.0 on CPU), or None on OOM."""
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            self.step(model, opt, torch.randint(vocab, (batch, seq_len), device=self.device))
            self.sync()
            return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
        except Exception as e:
            if not is_oom(e):
                raise
        opt.zero_grad(set_to_none=True)
        free_memory(self.device)
        return None

    def max_batch(self, setup: Setup, case: Case, limit: int, granularity: int, budget_s: float) -> dict:
        """Largest micro-batch with one full training step in memory (one model, optimizer states
        already allocated by a first step at the config's micro-batch)."""
        free_memory(self.device)
        model, opt, cfg, _ = self.build(setup, case)
        probe = lambda b: self.fits(model, opt, cfg.vocab_size, setup.seq_len, b)  # noqa: E731
        result = largest_fitting(probe, setup.micro_batch, limit, granularity, budget_s)
        if self.device.type != "cuda":
            result["peak_allocated_gib"] = None
        del model, opt
        free_memory(self.device)
        return result


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
    return {"largest_fit": good or None, "first_oom": bad, "peak_allocated_gib": peak,
            "probes": probes, "note": "; ".join(note)}


def matmul_tflops(device: torch.device) -> float:
    """Measured dense matmul rate (bf16 8192^3 on a GPU, fp32 256^3 on CPU), beside the datasheet's."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (256, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 10
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(meta: dict, cases: list[dict], max_batch: list[dict]) -> str:
    """The tables as Markdown, meta first (what the numbers mean)."""
    lines = [f"Device: {meta['device']}; torch {meta['torch']}; {meta['precision']}.",
             f"Data: {meta['data']}. Sequence length: GaLore's ({meta['seq_len']}).",
             f"Step time: median of the timed steps ({meta['timing']}), after {meta['warmup']} warm-up step(s). "
             f"MFU: {meta['flops']} / {meta['peak_label']}. Measured matmul: {meta['matmul_tflops']:.1f} TFLOP/s.",
             f"GaLore: {meta['galore']}. Memory options: {meta['memory_options']}.",
             "", "| model | case | micro-batch | peak alloc GiB | peak reserved GiB | step ms | tokens/s "
             "| TFLOP/s | MFU | note |", "|" + " --- |" * 10]
    for r in cases:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['case']} | | | | | | | | {r['status']}: {r['note']} |")
            continue
        lines.append(f"| {r['model']} | {r['case']} | {r['micro_batch']} | {_num(r.get('peak_allocated_gib'), '.2f')} "
                     f"| {_num(r.get('peak_reserved_gib'), '.2f')} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['tflops']:.4g} | {r['mfu']:.1%} | {r['note']} |")
    if max_batch:
        lines += ["", f"Largest micro-batch (seq {meta['seq_len']}) with one training step in memory:", "",
                  "| model | case | largest fit | first OOM | peak alloc GiB at largest | note |",
                  "|" + " --- |" * 6]
        for r in max_batch:
            lines.append(f"| {r['model']} | {r['case']} | {_num(r['largest_fit'], 'd')} | {_num(r['first_oom'], 'd')} "
                         f"| {_num(r['peak_allocated_gib'], '.2f')} | {r['note']} |")
    return "\n".join(lines) + "\n"


def save(out: Path, meta: dict, cases: list[dict], max_batch: list[dict], t_start: float) -> str:
    """Write bench_gpu.json and bench_gpu.md into `out`; return the Markdown."""
    meta["wall_s"] = time.perf_counter() - t_start
    (out / "bench_gpu.json").write_text(json.dumps({"meta": meta, "cases": cases, "max_batch": max_batch},
                                                   indent=1, allow_nan=False))
    table = markdown(meta, cases, max_batch)
    (out / "bench_gpu.md").write_text(table)
    return table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="every case on CPU with a tiny model, in seconds")
    p.add_argument("--out", help="directory for bench_gpu.md and bench_gpu.json (default: $OUT, else cwd)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--case-budget-s", type=float, default=15.0, help="time budget of one case")
    p.add_argument("--budget-s", type=float, default=390.0,
                   help="wall budget of the whole run: cases stop starting 100 s before it, and the "
                        "micro-batch searches share what is left (at most 40 s each)")
    p.add_argument("--skip-max-batch", action="store_true", help="skip the largest-micro-batch search")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown model {bad[0]!r}; choose from {','.join(MODELS)}")
    args.models = models
    if args.steps < 2 or args.warmup < 1:
        p.error("--steps must be >= 2 and --warmup >= 1")
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 3), 1
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or with --smoke on CPU")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    galore_cls, galore_note = load_galore_adamw()
    matmul = matmul_tflops(device)
    bench = Bench(device, args.steps, args.warmup, args.case_budget_s, galore_cls)
    setups = [SMOKE_SETUP] if args.smoke else [load_setup(m) for m in args.models]
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)  # noqa: E731
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "smoke": args.smoke,
            "precision": "bf16 torch.autocast, fp32 parameters and AdamW states",
            "data": "random token ids (one fixed batch per case); speed and memory only",
            "seq_len": setups[0].seq_len, "warmup": args.warmup,
            "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter",
            "flops": "6 x matmul params + 12 x layers x width x seq per token (model FLOPs)",
            "peak_tflops": bench.peak / 1e12, "matmul_tflops": matmul, "peak_label": bench.peak_label,
            "galore": "; ".join(filter(None, [
                "skipped" if galore_cls is None else "GaLore AdamW, rank/update_proj_gap/scale from each config, "
                "its SVD (every update_proj_gap steps) falls in the warm-up", galore_note])),
            "memory_options": f"loss_chunk_size={setups[0].loss_chunk}, recompute_swiglu=True"}
    log(f"{meta['device']}, torch {meta['torch']}, matmul {matmul:.1f} TFLOP/s; {meta['data']}")
    if galore_note:
        log(f"GaLore: {galore_note}")
    cases = []
    for setup in setups:
        for case in CASES:
            if time.perf_counter() - t_start > args.budget_s - 100:
                r = {"status": "skipped", "note": "run time budget spent"}
            else:
                r = bench.run_case(setup, case)
            cases.append({"model": setup.name, "case": case.name, **r})
            save(out, meta, cases, [], t_start)
            log(f"{setup.name} | {case.name}: " + (
                f"{r['step_ms']:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, "
                f"peak {_num(r.get('peak_allocated_gib'), '.2f') or 'n/a (CPU)'} GiB" if r["status"] == "ok"
                else f"{r['status']}: {r['note']}"))
    max_batch = []
    if not args.skip_max_batch:
        setup = SMOKE_SETUP if args.smoke else load_setup("llama_350m")
        limit, granularity = (4 * setup.micro_batch, 1) if args.smoke else (4096, 8)
        for case in (CASES[0], CASES[3]):
            left = args.budget_s - (time.perf_counter() - t_start)
            r = {"largest_fit": None, "first_oom": None, "peak_allocated_gib": None, "probes": [],
                 "note": "skipped: run time budget spent"}
            if left >= 10 or args.smoke:
                try:
                    r = bench.max_batch(setup, case, limit, granularity, budget_s=min(40.0, left / 2))
                except Exception as e:  # keep the case table even if the search breaks
                    r["note"] = f"error: {one_line(e)}"
            max_batch.append({"model": setup.name, "case": case.name, **r})
            log(f"{setup.name} | {case.name}: largest micro-batch {r['largest_fit']} "
                f"(first OOM {r['first_oom']}) {r['note']}")
    table = save(out, meta, cases, max_batch, t_start)
    log(f"wrote {out / 'bench_gpu.md'} and {out / 'bench_gpu.json'}")
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
