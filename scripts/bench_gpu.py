"""The one GPU check: proves the GPU path in one run that fits a lease (at most 6 minutes on one H100/H200).

    bash scripts/bench_gpu.sh                  # on the GPU machine: installs .whl/ offline, then this
    python scripts/bench_gpu.py --smoke        # every section on CPU at toy sizes (CI)

Sections, in order, each under its own time budget (a share of --budget-s), each catching its own failure:
environment; a correctness gate (train_c4.py itself, bf16 against fp32, resume; training/gpu_check/gate.py)
before any timing; memory per method on DeepSpeed's bf16 path beside the CPU accounting and the planner;
interleaved step times against full-rank at llama_60m and llama_350m, codecs fused and eager; the largest
micro-batch per method at llama_350m; a profiler top-10 of one step. bench_gpu.json and bench_gpu.md go to
--out (else $OUT, else .) after every section; the Markdown is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import train_c4  # noqa: E402
from training.distributed import init_distributed  # noqa: E402
from training.methods import METHODS as ALL_METHODS  # noqa: E402
from training.gpu_check import gate, perf  # noqa: E402
from training.gpu_check.env import environment, galore_without_8bit  # noqa: E402
from training.gpu_check.methods import Size, codec_variants, method_variants  # noqa: E402
from training.gpu_check.report import Budget, Report, one_line  # noqa: E402
from velora.config import CODECS  # noqa: E402

CONFIGS = REPO / "configs"
TINY_CONFIG = str(CONFIGS / "llama_tiny.json")
# The methods compared (training/methods.py): full-rank, sr2_all, VeLoRA all, and those two
# with the memory options (loss_chunk_size + recompute_swiglu).
METHODS = {m: ALL_METHODS[m].sets for m in ("full_rank", "sr2_all", "velora_all", "sr2_all_memopts",
                                                "velora_all_memopts")}
PROFILED = ("full_rank", "sr2_all")
TOY = ("model.hidden_size=64", "model.intermediate_size=176", "model.num_attention_heads=4",
       "model.num_hidden_layers=2", "model.vocab_size=256", "model.max_sequence_length=32", "data.seq_len=32")
# Each section ends by this share of --budget-s (time a section leaves unused goes to the next one).
SHARES = {"environment": 0.02, "gate": 0.30, "memory": 0.40, "speed": 0.70, "max_batch": 0.90, "profile": 1.0}


def plan(smoke: bool) -> dict:
    """The sizes each section runs at: toy ones on CPU, GaLore's configs on a GPU."""
    if smoke:
        toy = Size("toy", TINY_CONFIG, 4, TOY)
        return {"memory": toy, "speed": [toy, Size("toy-b2", TINY_CONFIG, 2, TOY)], "max_batch": toy,
                "max_batch_limit": (16, 1), "profile": toy, "rounds": 2, "warmup": 1}
    m60, m350 = str(CONFIGS / "llama_60m.json"), str(CONFIGS / "llama_350m.json")
    return {"memory": Size("llama_60m", m60, 8), "speed": [Size("llama_60m", m60, 256), Size("llama_350m", m350, 128)],
            "max_batch": Size("llama_350m", m350, 64), "max_batch_limit": (2048, 16),
            "profile": Size("llama_60m", m60, 16), "rounds": 6, "warmup": 2}


class GpuCheck:
    """The sections of one run, in order (the glue; the measuring is in training/gpu_check/)."""

    def __init__(self, sizes: dict, device: torch.device, report: Report):
        self.sizes, self.device, self.report = sizes, device, report
        self.variants, self.variant_notes = codec_variants(TINY_CONFIG)

    def sections(self) -> dict:
        return {"environment": self.environment, "gate": self.gate, "memory": self.memory, "speed": self.speed,
                "max_batch": self.max_batch, "profile": self.profile}

    def each_method(self, rec: dict, budget: Budget, measure) -> None:
        """One row per method: `measure(overrides, seconds it may take)` gives its fields; an OOM or an error
        is recorded in the row, and what is left of the budget is shared among the methods still to run."""
        init_distributed()
        for i, (method, sets) in enumerate(METHODS.items()):
            row = {"method": method}
            rec["rows"].append(row)
            share_s = budget.left() / (len(METHODS) - i)
            if share_s <= 0:
                row["status"] = "skipped: time budget spent"
                continue
            try:
                row.update(measure(sets, share_s), status="ok")
            except Exception as e:
                row.update(status="OOM" if perf.is_oom(e) else "error", note=one_line(e))
            self.report.save()

    def environment(self, rec: dict, budget: Budget) -> None:
        rec["codec_variants"] = "; ".join([", ".join(self.variants)] + self.variant_notes)
        rec.update(environment(self.device, self.sizes["speed"][-1].run_config().model))

    def gate(self, rec: dict, budget: Budget) -> None:
        cases = gate.gate_cases(CODECS, self.variants)
        gate.run_gate(rec, budget, cases, train_c4.main, TINY_CONFIG, self.device.type == "cpu", self.report.save,
                      self.report.out)

    def memory(self, rec: dict, budget: Budget) -> None:
        size = self.sizes["memory"]
        rec.update(size=size.name, micro_batch=size.micro_batch)
        self.each_method(rec, budget, lambda sets, _: perf.memory_row(size, sets, self.device))

    def speed(self, rec: dict, budget: Budget) -> None:
        init_distributed()
        opts = {"rounds": self.sizes["rounds"], "warmup": self.sizes["warmup"]}
        runs = method_variants(METHODS, self.variants)
        sizes = self.sizes["speed"]
        for i, size in enumerate(sizes):            # each size gets an equal share of what is left
            share = Budget(time.perf_counter() + budget.left() / (len(sizes) - i))
            for attempt in (size, dataclasses.replace(size, micro_batch=size.micro_batch // 2)):
                try:
                    perf.speed_size(rec, share, self.device, attempt, runs, opts, self.report.save)
                    break
                except Exception as e:               # the full-rank engine does not fit: once at half the batch
                    rec["rows"].append({"size": size.name, "micro_batch": attempt.micro_batch,
                                        "status": "OOM" if perf.is_oom(e) else "error", "note": one_line(e)})
                    if not perf.is_oom(e) or attempt.micro_batch < 2:
                        break

    def max_batch(self, rec: dict, budget: Budget) -> None:
        size, (limit, granularity) = self.sizes["max_batch"], self.sizes["max_batch_limit"]
        rec.update(size=size.name, start=size.micro_batch, limit=limit, granularity=granularity)
        self.each_method(rec, budget, lambda sets, share_s: perf.max_batch_row(size, sets, limit, granularity,
                                                                               share_s, self.device))

    def profile(self, rec: dict, budget: Budget) -> None:
        init_distributed()
        size = self.sizes["profile"]
        rec.update(size=size.name, micro_batch=size.micro_batch)
        for method in PROFILED:
            if budget.spent():
                rec[f"{method}_status"] = "skipped: time budget spent"
                continue
            rows, kernels = perf.profile_rows(size, METHODS[method], self.device)
            rec["rows"] += [{"method": method, **r} for r in rows]
            rec[f"{method}_gpu_kernels_per_step"] = kernels
            self.report.save()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="every section on CPU at toy sizes")
    p.add_argument("--out", help="directory for bench_gpu.json and bench_gpu.md (default: $OUT, else .)")
    p.add_argument("--budget-s", type=float,
                   help="wall budget of the sections together (default 290 s: with the start-up, bench_gpu.sh's "
                        "install and a section's 20 s grace, 6 min; "
                        "--smoke: 1200 s, a guard for a slow CI machine)")
    p.add_argument("--sections", default=",".join(SHARES), help=f"comma-separated subset of {','.join(SHARES)}")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in args.sections if s not in SHARES]
    if bad:
        p.error(f"--sections: unknown section {bad[0]!r}; choose from {','.join(SHARES)}")
    args.budget_s = args.budget_s or (1200.0 if args.smoke else 290.0)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or with --smoke on CPU")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    out = Path(args.out or os.environ.get("OUT") or ".").absolute()
    command = shlex.join(["scripts/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {"smoke": args.smoke, "budget_s": args.budget_s, "command": command,
            "device": "CPU" if args.smoke else torch.cuda.get_device_name(0),
            "data": "gate: a synthetic Markov-chain corpus; other sections: random token ids",
            "precision": "DeepSpeed bf16: bf16 weights, fp32 master weights and optimizer state",
            "galore": galore_without_8bit() or "galore_torch imports as is"}
    report = Report(out, meta, args.budget_s)
    funcs = GpuCheck(plan(args.smoke), device, report).sections()
    for name in args.sections:
        rec = report.run(name, funcs[name], SHARES[name])
        print(f"[{report.meta['wall_s']:6.1f}s] {name}: {rec['status']} {rec.get('error', '')}", flush=True)
    print("\n" + report.save(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
