"""VeLoRA and the other activation codecs vs GaLore vs full-rank: every method as a full `train_c4.py` run on
the same model, data, token budget and seeds, then one table and one plot.

    scripts/compare_galore.sh --preset quick      # tiny model, built-in corpus: a few minutes on 2 CPU cores
    scripts/compare_galore.sh --preset cpu        # the reproducible CPU comparison: 3 seeds, lr swept (~1 h)
    scripts/compare_galore.sh --preset official   # the official GaLore/VeLoRA codes' 20M setup, as exactly as we can
    scripts/compare_galore.sh                     # llama_60m with GaLore's recipe (a GPU)
    scripts/compare_galore.sh --config CFG --tokens N --seeds 3 --lr-sweep --methods full_rank,sr2_all ...

Methods (`--methods` picks some; METHODS below lists them all). `--seeds N` trains every method at seeds
0..N-1 (`train.seed`, `data.seed` and `velora.seed`: initial weights, data order and codec noise; the same
seed gives every method the same initial weights and batches). `--lr-sweep` tries a log-spaced grid of
`--lr-points` learning rates a factor 2 apart (10 per 3 decades: 5 per decade and a half) around each
method's default, every lr at every seed, and extends it while the best mean validation loss sits at an
edge; with `--sweep-seeds K` the sweep runs seeds 0..K-1 only and the best lr then runs at every seed
(a cheaper protocol: the lr is chosen on fewer seeds, the reported mean covers them all). GaLore keeps its recipe's two parameter groups: one lr for all, its projected matrices' updates
scaled by 0.25; the sweep moves that one lr. Each run lives in OUT/runs/<name>/ with its log
OUT/logs/<name>.log; a run that completed with the same command line is reused, so the script resumes and
re-tabulates. Memory columns are measured here, in this process, from real tensors. Writes
OUT/results.csv, OUT/results.md and OUT/plot.png (compare_report.py). Exits non-zero when a run failed for
another reason than a diverged loss.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from training import cli  # noqa: E402
from training.config import load_config, resolve_batch  # noqa: E402
from training.errors import ConfigError  # noqa: E402

SHARED = REPO.parent / "shared"
C4_SAMPLE = SHARED / "c4-sample" / "en"
SP_32K = SHARED / "tokenizers" / "sp-bpe-32k.model"


@dataclass
class Method:
    label: str
    sets: list = field(default_factory=list)
    galore: bool = False
    centre: float | None = None      # the lr sweep's default centre (else the AdamW or GaLore default)
    reference: str = "full_rank"     # the full-rank method with the same lr recipe, paired against in the report


ALL = "velora.targets=all"
METHODS = {
    "full_rank": Method("full-rank AdamW"),
    # GaLore's lr split without its projection: tells what GaLore gains from the split from what it gains from
    # projecting (its recipe gives the attention/MLP matrices 0.25 x the lr of everything else)
    "full_rank_split": Method("full-rank AdamW, matrices at 0.25 x lr (GaLore's split, no projection)",
                              ["optim.matrix_lr_scale=0.25"], centre=0.01),
    "full_rank_ckpt": Method("full-rank AdamW + activation checkpointing", ["model.activation_checkpointing=true"]),
    "galore": Method("GaLore AdamW", galore=True),
    "velora_paper": Method("VeLoRA paper (v_proj+down_proj)", ["velora.targets=paper"]),
    "velora_all": Method("VeLoRA all", [ALL]),
    "sr2_all": Method("sr2 all (2-bit stochastic rounding)", [ALL, "velora.codec=sr2"]),
    "sr4_all": Method("sr4 all", [ALL, "velora.codec=sr4"]),
    "sr8_all": Method("sr8 all", [ALL, "velora.codec=sr8"]),
    "rademacher_all": Method("random ±1 sub-token basis, all", [ALL, "velora.codec=rademacher"]),
    "gaussian_all": Method("random Gaussian sub-token basis, all", [ALL, "velora.codec=gaussian"]),
    "pca_all": Method("principal directions + random residual, all", [ALL, "velora.codec=pca"]),
    # The codecs under GaLore's lr split: the fair test against full_rank_split, the best full-rank recipe here
    "sr2_all_split": Method("sr2 all, matrices at 0.25 x lr", [ALL, "velora.codec=sr2", "optim.matrix_lr_scale=0.25"],
                            centre=0.01, reference="full_rank_split"),
    "velora_all_split": Method("VeLoRA all, matrices at 0.25 x lr", [ALL, "optim.matrix_lr_scale=0.25"], centre=0.01,
                               reference="full_rank_split"),
    "sr2_velora_down": Method("sr2 for q/k/v + gate/up, VeLoRA down_proj",
                              [ALL, "velora.codec=sr2", 'velora.codec_overrides={"down_proj":"velora"}']),
    "velora_all_galore": Method("VeLoRA all + GaLore AdamW", [ALL], galore=True),
    "velora_all_memopts": Method("VeLoRA all + loss_chunk_size + recompute_swiglu",
                                 [ALL, "model.loss_chunk_size=1024", "model.recompute_swiglu=true"]),
    "sr2_all_memopts": Method("sr2 all + loss_chunk_size + recompute_swiglu",
                              [ALL, "velora.codec=sr2", "model.loss_chunk_size=1024", "model.recompute_swiglu=true"]),
    "sr2_velora_down_memopts": Method("sr2 for q/k/v + gate/up, VeLoRA down_proj + loss_chunk_size + recompute_swiglu",
                                      [ALL, "velora.codec=sr2", 'velora.codec_overrides={"down_proj":"velora"}',
                                       "model.loss_chunk_size=1024", "model.recompute_swiglu=true"]),
}
GALORE_LR = 0.01
# The paper's 60M sub-token sizes (M = 8 for hidden-wide inputs, 16 for down_proj): at small widths the
# paper's grouping (hidden / 64 groups) gives M = 1 or 2, which is nearly exact and shows nothing.
SMALL_VELORA = ["velora.sub_token_size=8", 'velora.sub_token_overrides={"down_proj":16}']


@dataclass
class Preset:
    """Defaults of one comparison setting; command-line options override them."""

    config: str
    sets: list
    methods: list
    tokens: int = 0                  # 0: the config's max_steps worth
    seeds: int = 1
    lr_sweep: bool = False
    lrs: dict = field(default_factory=dict)     # method -> lr (else GaLore's 0.01 or the config's optim.lr)
    galore: dict = field(default_factory=dict)  # rank / update_proj_gap (default hidden/4, min(200, steps/50))
    jobs: int = 1
    evals: int = 4


def _cpu_data() -> list:
    """The real C4 sample when this machine has it, else the built-in corpus (a fresh clone elsewhere)."""
    return ["data.source=local", f"data.path={C4_SAMPLE}"] if C4_SAMPLE.is_dir() else ["data.source=builtin"]


PRESETS = {
    "gpu": Preset("configs/llama_60m.json", [], list(METHODS)),
    "quick": Preset("configs/llama_tiny.json", SMALL_VELORA + [
        "model.hidden_size=64", "model.intermediate_size=172", "model.num_attention_heads=4",
        "model.num_hidden_layers=2", "model.max_sequence_length=128", "data.seq_len=128", "data.val_tokens=16384",
        "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16"],
        ["full_rank", "full_rank_ckpt", "galore", "velora_paper", "velora_all", "sr2_all", "velora_all_galore",
         "velora_all_memopts"], tokens=300_000, jobs=2),
    # The reproducible CPU comparison: a 128-wide, 2-layer LLaMA, every method that matters at 3 seeds, lr swept.
    "cpu": Preset("configs/llama_tiny.json", _cpu_data() + SMALL_VELORA + [
        "model.hidden_size=128", "model.intermediate_size=352", "model.num_attention_heads=4",
        "model.num_hidden_layers=2", "model.vocab_size=2048", "data.val_tokens=131072",
        "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16"],
        ["full_rank", "galore", "velora_all", "sr2_velora_down"], tokens=500_000, seeds=3, lr_sweep=True,
        lrs={"full_rank": 0.002, "velora_all": 0.002, "sr2_velora_down": 0.002}, jobs=2, evals=8),
    # The official codes' setup (GaLore's torchrun_main.py and VeLoRA's script on LLaMA-20M): see
    # docs/BENCHMARKS.md for where our pipeline still differs.
    "official": Preset("configs/llama_20m.json", [
        "data.source=local", f"data.path={C4_SAMPLE}", f"data.tokenizer={SP_32K}", "data.packing=galore",
        "data.val_tokens=10000000", "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16",
        "deepspeed.bf16.enabled=false", "optim.weight_decay=0.0", "deepspeed.gradient_clipping=0.0",
        "optim.warmup_ratio=0.1", "optim.min_lr_ratio=0.1", "train.max_steps=300",
        'velora.sub_token_overrides={"v_proj":8,"down_proj":16}',
        # what update-by-update parity showed the official codes do (scripts/reference_parity.py, issue 21)
        "data.add_bos=true", "data.pad_id=0", "velora.coef_dtype=float16", "velora.grad_scale=1.5"],
        ["full_rank", "velora_paper", "galore"], lrs={"full_rank": 1e-3, "velora_paper": 1e-3, "galore": 1e-2},
        galore={"rank": 64, "update_proj_gap": 50}, evals=6),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="gpu", help="the setting's defaults (see above)")
    p.add_argument("--quick", action="store_true", help="the same as --preset quick")
    p.add_argument("--config", help="run config (default: the preset's)")
    p.add_argument("--tokens", type=int, help="training tokens per run (default: the preset's, else max_steps worth)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 for every method (default: the preset's)")
    p.add_argument("--lr-sweep", action="store_true", default=None, help="sweep the lr per method (see above)")
    p.add_argument("--lr-points", type=int, default=5, help="initial points of the lr grid (factor 2 apart)")
    p.add_argument("--sweep-seeds", type=int, help="seeds the lr sweep runs (default: all); the best lr runs at all")
    p.add_argument("--lr", type=float, help="lr (or the sweep's centre) of the AdamW methods")
    p.add_argument("--galore-lr", type=float,
                   help=f"lr (or the sweep's centre) of the GaLore methods and the *_split ones ({GALORE_LR})")
    p.add_argument("--out", help="output directory (default: runs/compare_<preset>)")
    p.add_argument("--methods", help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every method")
    p.add_argument("--method-set", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                   help="override for one method (e.g. galore:optim.galore_rank=64)")
    p.add_argument("--evals", type=int, help="validation evaluations per run (the loss curve's points)")
    p.add_argument("--jobs", type=int, help="runs at once, each with cores / jobs threads (one-thread runs side by "
                                            "side beat two-thread runs on a busy small CPU; step times are then "
                                            "measured under shared load)")
    p.add_argument("--measure-batch", type=int, default=8, help="batch of the in-process memory measurement "
                                                                "(scaled linearly to the micro-batch)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    return args


class Plan:
    """The runs of one comparison: the common settings, and one train_c4.py command per (method, lr, seed)."""

    def __init__(self, args):
        pre = PRESETS[args.preset]
        if args.preset == "official" and not (C4_SAMPLE.is_dir() and SP_32K.is_file()):
            raise ConfigError(f"--preset official needs the C4 sample ({C4_SAMPLE}) and the 32k tokenizer ({SP_32K})")
        self.args, self.preset = args, pre
        self.config = args.config or pre.config
        self.common = list(pre.sets) + list(args.set)
        self.base = load_config(self.config, self.common)               # ConfigError on a bad --set / config
        self.tokens_per_step = resolve_batch(self.base.deepspeed, 1)[0] * self.base.data.seq_len
        tokens = args.tokens or pre.tokens or self.base.train.max_steps * self.tokens_per_step
        self.steps = max(1, math.ceil(tokens / self.tokens_per_step))
        self.eval_every = max(1, math.ceil(self.steps / max(1, args.evals or pre.evals)))
        self.galore_gap = pre.galore.get("update_proj_gap", min(200, max(1, self.steps // 50)))
        self.galore_rank = pre.galore.get("rank", max(1, self.base.model.hidden_size // 4))
        self.seeds = list(range(args.seeds or pre.seeds))
        self.sweep_seeds = self.seeds[:args.sweep_seeds] if args.sweep_seeds else self.seeds
        self.lr_sweep = pre.lr_sweep if args.lr_sweep is None else args.lr_sweep
        self.out = Path(args.out or f"runs/compare_{args.preset}")
        self.per_method = {}
        for item in args.method_set:
            name, _, override = item.partition(":")
            if name not in METHODS or not override:
                raise ConfigError(f"--method-set {item!r}: expected METHOD:SECTION.KEY=VALUE with METHOD one of "
                                  f"{', '.join(METHODS)}")
            self.per_method.setdefault(name, []).append(override)
        self.methods = [m.strip() for m in (args.methods or ",".join(pre.methods)).split(",") if m.strip()]
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
        if args.lr_points < 1 or any(n is not None and n < 1 for n in (args.seeds, args.sweep_seeds)):
            raise ConfigError("--lr-points, --seeds and --sweep-seeds must be positive")

    def centre_lr(self, method: str) -> float:
        m = METHODS[method]
        if m.galore or m.centre:
            return self.args.galore_lr or self.preset.lrs.get(method, m.centre or GALORE_LR)
        return self.args.lr or self.preset.lrs.get(method, self.base.optim.lr)

    def initial_lrs(self, method: str) -> list:
        if not self.lr_sweep:
            return [self.centre_lr(method)]
        n = self.args.lr_points
        return [self.centre_lr(method) * 2.0 ** (k - n // 2) for k in range(n)]

    def run(self, method: str, lr: float, seed: int) -> dict:
        m = METHODS[method]
        opt = (["optim.name=galore_adamw", f"optim.galore_rank={self.galore_rank}",
                f"optim.galore_update_proj_gap={self.galore_gap}", "optim.galore_scale=0.25"]
               if m.galore else ["optim.name=adamw"])
        name = method + (f"_lr{lr:.4g}" if self.lr_sweep else "") + (f"_s{seed}" if len(self.seeds) > 1 else "")
        sets = self.common + opt + m.sets + self.per_method.get(method, []) + [
            f"optim.lr={lr!r}", f"train.seed={seed}", f"data.seed={seed}", f"velora.seed={seed}",
            f"train.max_steps={self.steps}", f"train.eval_every={self.eval_every}", f"train.save_every={self.steps}",
            f"train.log_every={max(1, min(10, self.steps // 20))}", "train.keep_last=1",
            f"train.output_dir={self.out / 'runs' / name}"]
        cmd = [sys.executable, "train_c4.py", "--config", self.config] + [a for s in sets for a in ("--set", s)]
        return {"name": name, "method": method, "label": m.label, "lr": lr, "seed": seed, "sets": sets,
                "config": self.config, "cmd": cmd, "run_dir": self.out / "runs" / name,
                "log": self.out / "logs" / f"{name}.log"}

    def facts(self) -> dict:
        argv = self.args.argv or []
        return {"config": self.config, "out": self.out, "steps": self.steps, "tokens_per_step": self.tokens_per_step,
                "tokens": self.steps * self.tokens_per_step, "galore_rank": self.galore_rank,
                "galore_gap": self.galore_gap, "base": self.base, "seeds": self.seeds, "lr_sweep": self.lr_sweep,
                "sweep_seeds": self.sweep_seeds,
                "preset": self.args.preset, "methods": self.methods,
                "references": {m: METHODS[m].reference for m in self.methods},
                "command": " ".join(shlex.quote(a) for a in ["scripts/compare_galore.sh"] + argv)}


MARKER = "compare_run.json"


def _done(run) -> dict | None:
    marker = run["run_dir"] / MARKER
    if marker.is_file():
        rec = json.loads(marker.read_text())
        if rec.get("cmd") == run["cmd"][1:] and rec.get("returncode") is not None:
            return rec
    return None


def execute(run, threads: int, lock) -> dict:
    """Run one train_c4.py (or reuse a finished identical run); stream its progress lines."""
    tag = f"[{run['name']}]"
    rec = _done(run)
    if rec is not None and (rec["returncode"] == 0 or rec.get("diverged")):
        print(f"{tag} reusing the completed run in {run['run_dir']}", flush=True)
        return rec
    if run["run_dir"].exists():
        if not (run["run_dir"] / MARKER).is_file():
            raise ConfigError(f"{run['run_dir']} exists and was not made by compare_galore; choose another --out")
        shutil.rmtree(run["run_dir"])                      # our own earlier, incomplete or different run
    run["run_dir"].mkdir(parents=True)
    (run["run_dir"] / MARKER).write_text(json.dumps({"cmd": run["cmd"][1:], "returncode": None}) + "\n")
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
            if line.startswith(("eval at", "final validation", "error", "Traceback")) or "Error" in line:
                with lock:
                    print(f"{tag} {line}", flush=True)
            if line and not line.startswith("train:"):
                last = line
        rc = proc.wait()
    error = None if rc == 0 else _error_line(run["log"]) or last
    rec = {"cmd": run["cmd"][1:], "returncode": rc, "wall_s": time.time() - t0, "error": error,
           "diverged": bool(error and "non-finite loss" in error)}
    (run["run_dir"] / MARKER).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"{tag} {'done' if rc == 0 else 'DIVERGED' if rec['diverged'] else 'FAILED'} in {rec['wall_s']:.0f} s"
          + (f": {error}" if rc else ""), flush=True)
    return rec


def _error_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln.split(":")[0]:
            return ln
    return lines[-1] if lines else "no output"


def sweep(plan: Plan, pool, threads: int) -> list[tuple[dict, dict]]:
    """Run every (method, lr, seed of the sweep); with --lr-sweep, extend each method's grid by a factor 2
    beyond an edge while the best mean validation loss sits there (at most 6 extensions per method); then
    run the seeds the sweep left out at each method's best lr."""
    lock = threading.Lock()
    lrs = {m: plan.initial_lrs(m) for m in plan.methods}
    done = {}

    def run_all(todo):
        for run, rec in zip(todo, pool.map(lambda r: execute(r, threads, lock), todo)):
            done[(run["method"], run["lr"], run["seed"])] = (run, rec)

    for _ in range(7):
        todo = [plan.run(m, lr, s) for m in plan.methods for lr in lrs[m] for s in plan.sweep_seeds
                if (m, lr, s) not in done]
        if not todo:
            break
        run_all(todo)
        if not plan.lr_sweep:
            break
        for m in plan.methods:
            best = _best_lr(done, m, len(plan.sweep_seeds))
            if best is None:                              # every lr diverged or failed: go lower
                lrs[m] = [min(lrs[m]) / 2] + lrs[m]
            elif best == min(lrs[m]):
                lrs[m] = [best / 2] + lrs[m]
            elif best == max(lrs[m]):
                lrs[m] = lrs[m] + [best * 2]
    rest = [s for s in plan.seeds if s not in plan.sweep_seeds]
    run_all([plan.run(m, best, s) for m in plan.methods if (best := _best_lr(done, m, len(plan.sweep_seeds)))
             for s in rest])
    return list(done.values())


def _best_lr(done: dict, method: str, n_seeds: int) -> float | None:
    """The lr with the lowest mean final validation loss over `n_seeds` seeds, or None when none finished."""
    from compare_report import lr_means

    means = lr_means([(r, read_log(r["run_dir"]) if rec["returncode"] == 0 else {})
                      for (m, _, s), (r, rec) in done.items() if m == method and s < n_seeds], n_seeds)
    finite = {lr: v for lr, v in means.items() if math.isfinite(v)}
    return min(finite, key=finite.get) if finite else None


def state_bytes(obj, seen: set) -> int:
    """Bytes of every tensor reachable from an optimizer state (GaLore keeps its projector as an object)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(state_bytes(v, seen) for v in vars(obj).values())
    return 0


def measure(run, measure_batch: int) -> dict:
    """Exact tensor bytes for one method: saved for backward per micro-batch (velora.memory, measured
    at `measure_batch` sequences and scaled), parameters, gradients, optimizer state after one step."""
    from training.optim import build_optimizer
    from training.build import build_model, seed_everything
    from velora.memory import measure_step

    # One process without DeepSpeed: the ZeRO 1/2 optimizers need an engine's partition layout.
    cfg = load_config(run["config"], run["sets"] + ["deepspeed.zero_optimization.stage=0"])
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
            "optim_state_bytes": state_bytes(optimizer.state, set()),
            "saved_bytes_micro": rep["saved_total"] * micro / b, "saved_measured_batch": b, "micro_batch": micro,
            "saved_by_category_micro": {k: v * micro / b for k, v in rep["saved"].items()}}


def read_log(run_dir: Path) -> dict:
    """What train_c4.py logged: the final evaluation, the eval curve, median step time and tokens/s, peak memory."""
    import statistics
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
        # x = steps x the nominal tokens per step, the same for every seed (tokens_seen varies with packing)
        cfg = json.loads((run_dir / "run_config.json").read_text())
        per_step = cfg["deepspeed"]["train_batch_size"] * cfg["data"]["seq_len"]
        out["curve"] = [(r["step"] * per_step, r["loss"]) for r in evals]
    return out


def compare(argv) -> int:
    args = parse_args(argv)
    args.argv = list(argv)
    plan = Plan(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    facts = plan.facts()
    print(f"compare_galore: {len(plan.methods)} method(s) x {len(plan.seeds)} seed(s)"
          f"{' x swept lrs' if plan.lr_sweep else ''}, {plan.steps} steps ({facts['tokens']:,} tokens) per run, "
          f"config {plan.config}, output {plan.out}", flush=True)
    jobs = max(1, args.jobs or plan.preset.jobs)
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)   # the cores this process may use (taskset, cgroups)
    facts.update(jobs=jobs, threads=threads)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = sweep(plan, pool, threads)
    rows, measured = [], {}
    for run, rec in sorted(results, key=lambda x: (plan.methods.index(x[0]["method"]), x[0]["lr"], x[0]["seed"])):
        status = "ok" if rec["returncode"] == 0 else "diverged" if rec.get("diverged") else "failed"
        row = {"name": run["name"], "method": run["method"], "label": run["label"], "lr": run["lr"],
               "seed": run["seed"], "status": status, "error": rec["error"] or "", "wall_s": rec["wall_s"],
               "command": " ".join(shlex.quote(a) for a in ["python"] + rec["cmd"])}
        if status == "ok":
            row.update(read_log(run["run_dir"]))
            if run["method"] not in measured:
                try:
                    measured[run["method"]] = measure(run, args.measure_batch)
                except Exception as e:                   # a measurement failure is reported, not fatal
                    measured[run["method"]] = {"measure_error": f"{type(e).__name__}: {e}"}
                    print(f"[{run['method']}] memory measurement failed: {type(e).__name__}: {e}", flush=True)
            row.update(measured[run["method"]])
        rows.append(row)
    from compare_report import write_reports
    write_reports(rows, facts, plan.out)
    failed = sorted({r["name"] for r in rows if r["status"] == "failed" or "measure_error" in r})
    print(f"compare_galore: wrote {plan.out / 'results.csv'}, {plan.out / 'results.md'}, {plan.out / 'plot.png'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    return cli.run(compare, "compare_galore", argv)


if __name__ == "__main__":
    sys.exit(main())
