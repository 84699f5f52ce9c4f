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
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

import train_c4  # noqa: E402
from compare_galore import METHODS as COMPARE_METHODS  # noqa: E402
from training.distributed import init_distributed  # noqa: E402
from training.gpu_check import gate, perf  # noqa: E402
from training.gpu_check.env import environment, galore_without_8bit  # noqa: E402
from training.gpu_check.methods import Size, codec_variants, method_variants  # noqa: E402
from training.gpu_check.report import Budget, Report, one_line  # noqa: E402
from velora.config import CODECS  # noqa: E402

CONFIGS = REPO / "configs"
TINY_CONFIG = str(CONFIGS / "llama_tiny.json")
# The methods compared (compare_galore.py's definitions): full-rank, sr2_all, VeLoRA all, and those two
# with the memory options (loss_chunk_size + recompute_swiglu).
METHODS = {m: COMPARE_METHODS[m].sets for m in ("full_rank", "sr2_all", "velora_all", "sr2_all_memopts",
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


def sections(args, sizes: dict, device: torch.device, report: Report) -> dict:
    """name -> section function (record, budget), in the order they run."""
    variants, variant_notes = codec_variants(TINY_CONFIG)
    runs = method_variants(METHODS, variants)

    def environment_section(rec, budget):
        rec["galore"] = galore_without_8bit() or "galore_torch imports as is"
        rec["codec_variants"] = "; ".join([", ".join(variants)] + variant_notes)
        rec.update(environment(device, sizes["speed"][-1].run_config().model))

    def gate_section(rec, budget):
        cases = gate.gate_cases(CODECS, variants)
        gate.run_gate(rec, budget, cases, train_c4.main, TINY_CONFIG, device.type == "cpu", report.save)

    def memory_section(rec, budget):
        init_distributed()
        rec["size"], rec["micro_batch"] = sizes["memory"].name, sizes["memory"].micro_batch
        for method, sets in METHODS.items():
            row = {"method": method}
            rec["rows"].append(row)
            if budget.spent():
                row["status"] = "skipped: time budget spent"
                continue
            try:
                row.update(perf.memory_row(sizes["memory"], sets, device), status="ok")
            except Exception as e:
                row.update(status="OOM" if perf.is_oom(e) else "error", note=one_line(e))
            report.save()

    def speed_section(rec, budget):
        init_distributed()
        opts = {"rounds": sizes["rounds"], "warmup": sizes["warmup"]}
        n = len(sizes["speed"])
        for i, size in enumerate(sizes["speed"]):   # each size gets an equal share of what is left
            try:
                share = Budget(time.perf_counter() + budget.left() / (n - i))
                perf.speed_size(rec, share, device, size, runs, opts, report.save)
            except Exception as e:                   # e.g. the full-rank engine does not fit
                rec["rows"].append({"size": size.name, "status": "error", "note": one_line(e)})

    def max_batch_section(rec, budget):
        init_distributed()
        size, (limit, granularity) = sizes["max_batch"], sizes["max_batch_limit"]
        rec.update(size=size.name, start=size.micro_batch, limit=limit, granularity=granularity)
        for i, (method, sets) in enumerate(METHODS.items()):
            row = {"method": method}
            rec["rows"].append(row)
            share_s = budget.left() / (len(METHODS) - i)
            if share_s <= 0:
                row["status"] = "skipped: time budget spent"
                continue
            try:
                row.update(perf.max_batch_row(size, sets, limit, granularity, share_s, device), status="ok")
            except Exception as e:
                row.update(status="error", note=one_line(e))
            report.save()

    def profile_section(rec, budget):
        init_distributed()
        rec["size"], rec["micro_batch"] = sizes["profile"].name, sizes["profile"].micro_batch
        for method in PROFILED:
            if budget.spent():
                rec[f"{method}_status"] = "skipped: time budget spent"
                continue
            rows, kernels = perf.profile_rows(sizes["profile"], METHODS[method], device)
            rec["rows"] += [{"method": method, **r} for r in rows]
            rec[f"{method}_gpu_kernels_per_step"] = kernels
            report.save()

    return {"environment": environment_section, "gate": gate_section, "memory": memory_section,
            "speed": speed_section, "max_batch": max_batch_section, "profile": profile_section}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="every section on CPU at toy sizes")
    p.add_argument("--out", help="directory for bench_gpu.json and bench_gpu.md (default: $OUT, else .)")
    p.add_argument("--budget-s", type=float,
                   help="wall budget of the sections together (default 330 s: with bench_gpu.sh's install, 6 min; "
                        "--smoke: 1200 s, a guard for a slow CI machine)")
    p.add_argument("--sections", default=",".join(SHARES), help=f"comma-separated subset of {','.join(SHARES)}")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in args.sections if s not in SHARES]
    if bad:
        p.error(f"--sections: unknown section {bad[0]!r}; choose from {','.join(SHARES)}")
    args.budget_s = args.budget_s or (1200.0 if args.smoke else 330.0)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or with --smoke on CPU")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    out = Path(args.out or os.environ.get("OUT") or ".").absolute()
    meta = {"smoke": args.smoke, "budget_s": args.budget_s, "command": shlex.join(["scripts/bench_gpu.py", *(argv or sys.argv[1:])]),
            "device": "CPU" if args.smoke else torch.cuda.get_device_name(0),
            "data": "gate: a synthetic Markov-chain corpus; other sections: random token ids",
            "precision": "DeepSpeed bf16: bf16 weights, fp32 master weights and optimizer state"}
    report = Report(out, meta, args.budget_s)
    funcs = sections(args, plan(args.smoke), device, report)
    for name in args.sections:
        rec = report.run(name, funcs[name], SHARES[name])
        print(f"[{report.meta['wall_s']:6.1f}s] {name}: {rec['status']} {rec.get('error', '')}", flush=True)
    print("\n" + report.save(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
