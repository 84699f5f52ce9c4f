"""VeLoRA vs GaLore vs full-rank: every method as a full `train_c4.py` run on the same model, data,
token budget and seed, then one table and one plot.

    scripts/compare_galore.sh --quick                       # tiny model, a few minutes on 2 CPU cores
    scripts/compare_galore.sh                               # llama_60m with GaLore's recipe (a GPU)
    scripts/compare_galore.sh --config CFG --tokens 2000000 --out runs/compare --set data.source=local ...

Methods (`--methods` picks some): full_rank (AdamW), full_rank_ckpt (+ activation checkpointing, same
micro-batch), galore (GaLore AdamW: rank hidden/4, update_proj_gap 200 or run length / 50, scale 0.25,
lr 0.01, ZeRO 0), velora_paper, velora_all, velora_all_galore, velora_all_memopts (VeLoRA `all` +
loss_chunk_size + recompute_swiglu). Each run lives in OUT/runs/<name>/ with its log OUT/logs/<name>.log;
a run that completed with the same command line is reused, so the script resumes and re-tabulates.
Memory columns are measured here, in this process, from real tensors (velora.memory for the bytes
saved for backward; the optimizer state after one real optimizer step). Writes OUT/results.csv,
OUT/results.md and OUT/plot.png (compare_report.py). Exits non-zero when any method failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from training.config import ConfigError, load_config, resolve_batch  # noqa: E402

METHODS = {   # name: (label, overrides, uses GaLore)
    "full_rank": ("full-rank AdamW", [], False),
    "full_rank_ckpt": ("full-rank AdamW + activation checkpointing", ["model.activation_checkpointing=true"], False),
    "galore": ("GaLore AdamW", [], True),
    "velora_paper": ("VeLoRA paper (v_proj+down_proj)", ["velora.targets=paper"], False),
    "velora_all": ("VeLoRA all", ["velora.targets=all"], False),
    "velora_all_galore": ("VeLoRA all + GaLore AdamW", ["velora.targets=all"], True),
    "velora_all_memopts": ("VeLoRA all + loss_chunk_size + recompute_swiglu",
                           ["velora.targets=all", "model.loss_chunk_size=1024", "model.recompute_swiglu=true"], False),
}
SWEEP_LRS = (0.01, 0.005, 0.001)
GALORE_LR = 0.01
# The paper's 60M sub-token sizes (M = 8 for hidden-wide inputs, 16 for down_proj): at small widths the
# paper's grouping (hidden / 64 groups) gives M = 1 or 2, which is nearly exact and shows nothing.
SMALL_VELORA = ["velora.sub_token_size=8", 'velora.sub_token_overrides={"down_proj":16}']
# --quick: a tiny model on the built-in corpus (a few minutes on 2 CPU cores)
QUICK = SMALL_VELORA + ["model.hidden_size=64", "model.intermediate_size=172", "model.num_attention_heads=4",
         "model.num_hidden_layers=2", "model.max_sequence_length=128", "data.seq_len=128", "data.val_tokens=16384",
         "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, short budget (CPU smoke run)")
    p.add_argument("--config", help="run config (default: configs/llama_60m.json; llama_tiny with --quick)")
    p.add_argument("--tokens", type=int, help="training tokens per method (default: the config's max_steps worth; "
                                                "300k with --quick)")
    p.add_argument("--lr-sweep", action="store_true", help=f"try lr {SWEEP_LRS} per method, keep the best on validation")
    p.add_argument("--lr", type=float, help="lr of the AdamW methods (default: the config's optim.lr)")
    p.add_argument("--galore-lr", type=float, default=GALORE_LR, help="lr of the GaLore methods (GaLore's recipe: 0.01)")
    p.add_argument("--out", help="output directory (default: runs/compare, runs/compare_quick with --quick)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every method")
    p.add_argument("--method-set", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                   help="override for one method (e.g. galore:optim.galore_rank=64)")
    p.add_argument("--evals", type=int, default=4, help="validation evaluations per run (the loss curve's points)")
    p.add_argument("--jobs", type=int, help="runs at once, each with cores / jobs threads (default 1; 2 with --quick: "
                                            "one-thread runs side by side beat two-thread runs on a busy small CPU); "
                                            "step times are then measured under shared load")
    p.add_argument("--measure-batch", type=int, default=8, help="batch of the in-process memory measurement "
                                                                "(scaled linearly to the micro-batch)")
    return p.parse_args(argv)


def plan(args) -> tuple[list[dict], dict]:
    """The runs to do: one dict per (method, lr), with the exact train_c4.py command; and run facts."""
    config = args.config or ("configs/llama_tiny.json" if args.quick else "configs/llama_60m.json")
    common = (QUICK if args.quick else []) + list(args.set)
    base = load_config(config, common)           # ConfigError on a bad --set / config
    tokens_per_step = resolve_batch(base.deepspeed, 1)[0] * base.data.seq_len
    tokens = args.tokens or (300_000 if args.quick else base.train.max_steps * tokens_per_step)
    steps = max(1, math.ceil(tokens / tokens_per_step))
    eval_every = max(1, math.ceil(steps / max(1, args.evals)))
    gap = min(200, max(1, steps // 50))          # GaLore: 200 over 10k steps = 50 projection updates
    galore_rank = max(1, base.model.hidden_size // 4)
    out = Path(args.out or ("runs/compare_quick" if args.quick else "runs/compare"))
    per_method = {}
    for item in args.method_set:
        name, _, override = item.partition(":")
        if name not in METHODS or not override:
            raise ConfigError(f"--method-set {item!r}: expected METHOD:SECTION.KEY=VALUE with METHOD one of "
                              f"{', '.join(METHODS)}")
        per_method.setdefault(name, []).append(override)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    runs = []
    for m in methods:
        label, extra, galore = METHODS[m]
        opt = (["optim.name=galore_adamw", f"optim.galore_rank={galore_rank}", f"optim.galore_update_proj_gap={gap}",
                "optim.galore_scale=0.25", "deepspeed.zero_optimization.stage=0"] if galore else ["optim.name=adamw"])
        default_lr = args.galore_lr if galore else (args.lr or base.optim.lr)
        for lr in (SWEEP_LRS if args.lr_sweep else (default_lr,)):
            name = f"{m}_lr{lr:g}" if args.lr_sweep else m
            sets = common + opt + extra + per_method.get(m, []) + [
                f"optim.lr={lr}", f"train.max_steps={steps}", f"train.eval_every={eval_every}",
                f"train.save_every={steps}", f"train.log_every={max(1, min(10, steps // 20))}", "train.keep_last=1",
                f"train.output_dir={out / 'runs' / name}"]
            cmd = [sys.executable, "train_c4.py", "--config", config] + [a for s in sets for a in ("--set", s)]
            runs.append({"name": name, "method": m, "label": label, "lr": lr, "sets": sets, "config": config,
                         "cmd": cmd, "run_dir": out / "runs" / name, "log": out / "logs" / f"{name}.log"})
    facts = {"config": config, "out": out, "steps": steps, "tokens_per_step": tokens_per_step,
             "tokens": steps * tokens_per_step, "galore_rank": galore_rank, "galore_gap": gap, "base": base,
             "command": " ".join(shlex.quote(a) for a in ["scripts/compare_galore.sh"] + (args.argv or []))}
    return runs, facts


def _done(run) -> dict | None:
    marker = run["run_dir"] / "compare_run.json"
    if marker.is_file():
        rec = json.loads(marker.read_text())
        if rec.get("cmd") == run["cmd"][1:] and rec.get("returncode") == 0:
            return rec
    return None


def execute(run, threads: int, lock) -> dict:
    """Run one train_c4.py (or reuse a completed identical run); stream its progress lines."""
    tag = f"[{run['name']}]"
    rec = _done(run)
    if rec is not None:
        print(f"{tag} reusing the completed run in {run['run_dir']}", flush=True)
        return rec
    shutil.rmtree(run["run_dir"], ignore_errors=True)     # an incomplete or different earlier run
    run["log"].parent.mkdir(parents=True, exist_ok=True)
    print(f"{tag} start: {' '.join(shlex.quote(a) for a in run['cmd'])}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    last = ""
    with open(run["log"], "w") as log:
        proc = subprocess.Popen(run["cmd"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, errors="replace")
        for line in proc.stdout:                          # text mode splits tqdm's \r updates too
            log.write(line)
            line = line.strip()
            if line.startswith(("step ", "eval at", "final validation", "error", "Traceback")) or "Error" in line:
                with lock:
                    print(f"{tag} {line}", flush=True)
            if line and not line.startswith("train:"):
                last = line
        rc = proc.wait()
    rec = {"cmd": run["cmd"][1:], "returncode": rc, "wall_s": time.time() - t0,
           "error": None if rc == 0 else _error_line(run["log"]) or last}
    run["run_dir"].mkdir(parents=True, exist_ok=True)
    (run["run_dir"] / "compare_run.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"{tag} {'done' if rc == 0 else 'FAILED'} in {rec['wall_s']:.0f} s"
          + (f": {rec['error']}" if rc else ""), flush=True)
    return rec


def _error_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln.split(":")[0]:
            return ln
    return lines[-1] if lines else "no output"


def _state_bytes(obj, seen: set) -> int:
    """Bytes of every tensor reachable from an optimizer state (GaLore keeps its projector as an object)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_state_bytes(v, seen) for v in vars(obj).values())
    return 0


def measure(run, measure_batch: int) -> dict:
    """Exact tensor bytes for one method: saved for backward per micro-batch (velora.memory, measured
    at `measure_batch` sequences and scaled), parameters, gradients, optimizer state after one step."""
    from training.optim import build_optimizer
    from training.trainer import build_model, seed_everything
    from velora.memory import measure_step

    cfg = load_config(run["config"], run["sets"])
    micro = resolve_batch(cfg.deepspeed, 1)[1]
    b = min(micro, measure_batch)
    seed_everything(cfg.train.seed)
    model, _ = build_model(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (b, cfg.data.seq_len))
    bf16 = bool(cfg.deepspeed.get("bf16", {}).get("enabled"))
    rep = measure_step(model, ids, torch.bfloat16 if bf16 else None)
    optimizer, _, _ = build_optimizer(model, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids)
    loss.backward()
    optimizer.step()
    return {"param_bytes": rep["parameters"], "grad_bytes": rep["gradients"],
            "optim_state_bytes": _state_bytes(optimizer.state, set()),
            "saved_bytes_micro": rep["saved_total"] * micro / b, "saved_measured_batch": b, "micro_batch": micro,
            "saved_by_category_micro": {k: v * micro / b for k, v in rep["saved"].items()}}


def read_log(run_dir: Path) -> dict:
    """What train_c4.py logged: the final evaluation, the eval curve, median step time and tokens/s, peak memory."""
    path = run_dir / "train_log.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    out = {}
    timed = train[1:] or train                          # the first logged step includes warm-up
    if timed:
        out["step_time_s"] = statistics.median(r["step_time_s"] for r in timed)
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
        out["tokens_trained"] = train[-1]["tokens_seen"]
        for key in ("peak_rss", "cuda_max_allocated", "cuda_max_reserved"):
            if key in train[-1]:
                out[key] = max(r.get(key, 0) for r in train)
    if evals:
        last = evals[-1]
        out.update(val_loss=last["loss"], val_ppl=last["ppl"], val_galore_ppl=last["galore_ppl"],
                   eval_tokens=last["tokens"], steps=last["step"])
        seen = {r["step"]: r["tokens_seen"] for r in train}
        per_step = train[-1]["tokens_seen"] / train[-1]["step"] if train else 0
        out["curve"] = [(seen.get(r["step"], r["step"] * per_step), r["loss"]) for r in evals]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        runs, facts = plan(args)
    except (ConfigError, ValueError) as e:
        print(f"compare_galore: error: {e}", file=sys.stderr)
        return 2
    out = facts["out"]
    out.mkdir(parents=True, exist_ok=True)
    print(f"compare_galore: {len(runs)} run(s) of {facts['steps']} steps ({facts['tokens']:,} tokens) each, "
          f"config {facts['config']}, output {out}", flush=True)
    lock = threading.Lock()
    jobs = max(1, args.jobs or (2 if args.quick else 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    facts.update(jobs=jobs, threads=threads)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        recs = list(pool.map(lambda r: execute(r, threads, lock), runs))
    rows = []
    for run, rec in zip(runs, recs):
        row = {"name": run["name"], "method": run["method"], "label": run["label"], "lr": run["lr"],
               "status": "ok" if rec["returncode"] == 0 else "failed", "error": rec["error"] or "",
               "wall_s": rec["wall_s"], "command": " ".join(shlex.quote(a) for a in ["python"] + rec["cmd"])}
        if rec["returncode"] == 0:
            row.update(read_log(run["run_dir"]))
            try:
                row.update(measure(run, args.measure_batch))
            except Exception as e:                   # a measurement failure is reported, not fatal
                row.update(status="failed", error=f"memory measurement: {type(e).__name__}: {e}")
        rows.append(row)
    from compare_report import write_reports
    write_reports(rows, facts, out)
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    print(f"compare_galore: wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'plot.png'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
