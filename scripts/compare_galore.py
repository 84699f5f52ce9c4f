"""VeLoRA and the other activation codecs vs GaLore vs full-rank: every method as a full `train_c4.py` run on
the same model, data, token budget and seeds, then one table and one plot.

    scripts/compare_galore.sh --preset quick      # tiny model, built-in corpus: a few minutes on 2 CPU cores
    scripts/compare_galore.sh --preset cpu        # the reproducible CPU comparison: 5 seeds, lrs tuned (<= 3 h, 2 cores)
    scripts/compare_galore.sh --preset official   # the official GaLore/VeLoRA codes' 20M setup, as exactly as we can
    scripts/compare_galore.sh                     # llama_60m with GaLore's recipe (a GPU)
    scripts/compare_galore.sh --config CFG --tokens N --seeds 3 --lr-sweep --methods full_rank,sr2_all ...

Methods (`--methods` picks some; METHODS below lists them all). `--seeds N` reports every method at seeds
0..N-1 (`train.seed`, `data.seed` and `velora.seed`: initial weights, data order and codec noise; the same
seed gives every method the same initial weights and batches). `--lr-sweep` chooses each method's lr on data
that is never reported: a log-spaced grid of `--lr-points` lrs a factor 2 apart around the method's default
runs at the tuning seeds (`--tune-seeds K`: seeds 1000..1000+K-1) and is scored on the tuning slice of
validation (its first `data.val_tokens` tokens); the grid is extended while the best mean loss sits at an
edge. The best lr then runs at the reported seeds, scored on the next `data.val_tokens` tokens
(`data.val_skip_tokens`), and once more, scoring only, on ../shared/c4-heldout when it is present.
`--matrix-lr-scales` also sweeps full-rank's `optim.matrix_lr_scale` (its matrices' lr / the lr of
embeddings, norms and head), so full-rank is tuned over both lrs as GaLore's recipe is; the AdamW methods
paired with full-rank then use full-rank's chosen scale. GaLore keeps its recipe's two parameter groups: one
lr for all, its projected matrices' updates scaled by 0.25; the sweep moves that one lr. Each run lives in
OUT/runs/<name>/ with its log OUT/logs/<name>.log; a run that completed with the same command line is
reused, so the script resumes and re-tabulates. Memory columns are measured here, in this process, from
real tensors. Writes OUT/results.csv, OUT/results.md and OUT/plot.png (compare_report.py). Exits non-zero
when a run failed for another reason than a diverged loss.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from training import cli  # noqa: E402
from training.config import load_config, resolve_batch  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from compare_runs import execute, read_log, score_heldout  # noqa: E402
from training.plan import state_bytes  # noqa: E402

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
    # The cheaper alternatives (issue 22): an 8-bit optimizer state, the optimizer offloaded by DeepSpeed
    "adamw8bit": Method("8-bit AdamW (bitsandbytes)", ["optim.name=adamw8bit"]),
    "zero_offload": Method("AdamW, optimizer state offloaded to the CPU (ZeRO-Offload, ZeRO 2)",
                           ["deepspeed.zero_optimization.stage=2",
                            'deepspeed.zero_optimization.offload_optimizer={"device":"cpu"}',
                            "deepspeed.zero_force_ds_cpu_optimizer=false"]),
    "adamw8bit_sr2_all": Method("8-bit AdamW + sr2 all", ["optim.name=adamw8bit", ALL, "velora.codec=sr2"]),
    "galore_sr2_all": Method("GaLore AdamW + sr2 all", [ALL, "velora.codec=sr2"], galore=True),
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
    galore: dict = field(default_factory=dict)  # rank / update_proj_gap (default hidden/4, min(200, steps/50)),
                                                # eps (default: optim.eps)
    jobs: int = 1
    evals: int = 4
    lr_points: int = 5               # initial points of each method's lr grid
    tune_seeds: int = 1              # seeds the lr sweep runs (never reported)
    scales: list = field(default_factory=list)  # full-rank's optim.matrix_lr_scale grid (empty: not swept)
    heldout_tokens: int = 10_000_000  # tokens of ../shared/c4-heldout scored per reported run


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
         "velora_all_memopts"], tokens=300_000, jobs=2, heldout_tokens=16384),
    # The reproducible CPU comparison (issue 21): a 128-wide, 2-layer LLaMA on the real C4 sample, 1,200 steps
    # of 2,048 tokens (past the unigram plateau early: see results.md's regime block), warmup and clipping shared
    # by every method; lrs chosen on tuning seed 1000 and the tuning slice, full-rank over lr x matrix_lr_scale;
    # 7 methods reported at 5 seeds. Sized to finish in <= 3 h on 2 cores (docs/BENCHMARKS.md).
    "cpu": Preset("configs/llama_tiny.json", _cpu_data() + SMALL_VELORA + [
        "model.hidden_size=128", "model.intermediate_size=352", "model.num_attention_heads=4",
        "model.num_hidden_layers=2", "model.vocab_size=2048", "model.max_sequence_length=128", "data.seq_len=128",
        "data.val_tokens=65536", "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16",
        "optim.warmup_ratio=0.1", "deepspeed.gradient_clipping=1.0"],
        ["full_rank", "full_rank_split", "galore", "velora_paper", "velora_all", "sr2_all", "sr2_velora_down"],
        tokens=1200 * 16 * 128, seeds=5, lr_sweep=True, lr_points=3, tune_seeds=1, scales=[0.25, 0.5, 1.0],
        lrs={"full_rank": 0.004}, jobs=2, evals=24, heldout_tokens=10_000_000),
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
        # eps: galore_torch's GaLoreAdamW default, which the official script leaves (both of its groups)
        galore={"rank": 64, "update_proj_gap": 50, "eps": 1e-6}, evals=6),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="gpu", help="the setting's defaults (see above)")
    p.add_argument("--quick", action="store_true", help="the same as --preset quick")
    p.add_argument("--config", help="run config (default: the preset's)")
    p.add_argument("--tokens", type=int, help="training tokens per run (default: the preset's, else max_steps worth)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 for every method (default: the preset's)")
    p.add_argument("--lr-sweep", action="store_true", default=None, help="sweep the lr per method (see above)")
    p.add_argument("--lr-points", type=int, help="initial points of the lr grid, factor 2 apart (default: the preset's)")
    p.add_argument("--tune-seeds", type=int, help="seeds the lr sweep runs, never reported (default: the preset's)")
    p.add_argument("--matrix-lr-scales", help="comma-separated initial grid of full-rank's optim.matrix_lr_scale "
                                              "(default: the preset's; none: not swept)")
    p.add_argument("--lr", type=float, help="lr (or the sweep's centre) of the AdamW methods")
    p.add_argument("--galore-lr", type=float,
                   help=f"lr (or the sweep's centre) of the GaLore methods and the *_split ones ({GALORE_LR})")
    p.add_argument("--out", help="output directory (default: runs/compare_<preset>)")
    p.add_argument("--methods", help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every method")
    p.add_argument("--method-set", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                   help="override for one method (e.g. galore:optim.galore_rank=64)")
    p.add_argument("--heldout-tokens", type=int, help="tokens of ../shared/c4-heldout scored per reported run "
                                                      "(default: the preset's; 0: none)")
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


TUNE_SEED0 = 1000                     # tuning seeds are 1000, 1001, ...: never a reported seed
SCALE_SWEPT = "full_rank"             # the method tuned over optim.lr x optim.matrix_lr_scale


def inherits_scale(method: str) -> bool:
    """Whether `method` trains with full-rank's chosen matrix_lr_scale: an AdamW method paired with full-rank
    that sets no lr recipe of its own."""
    m = METHODS[method]
    return (method != SCALE_SWEPT and not m.galore and m.reference == SCALE_SWEPT
            and not any(s.startswith("optim.matrix_lr_scale=") for s in m.sets))


class Plan:
    """The runs of one comparison: the common settings, and one train_c4.py command per (method, lr, matrix lr
    scale, seed), tuning runs apart from reported ones."""

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
        self.galore_eps = [f"optim.eps={pre.galore['eps']!r}"] if "eps" in pre.galore else []
        self.seeds = list(range(args.seeds or pre.seeds))
        self.lr_sweep = pre.lr_sweep if args.lr_sweep is None else args.lr_sweep
        self.lr_points = args.lr_points or pre.lr_points
        n_tune = args.tune_seeds or pre.tune_seeds
        self.tune_seeds = [TUNE_SEED0 + k for k in range(n_tune)] if self.lr_sweep else []
        scales = pre.scales if args.matrix_lr_scales is None else [
            float(x) for x in args.matrix_lr_scales.split(",") if x.strip() not in ("", "none")]
        self.scales = sorted(scales) if self.lr_sweep else []
        self.heldout_tokens = pre.heldout_tokens if args.heldout_tokens is None else args.heldout_tokens
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
        if any(n is not None and n < 1 for n in (args.lr_points, args.seeds, args.tune_seeds)):
            raise ConfigError("--lr-points, --seeds and --tune-seeds must be positive")
        if any(x <= 0 for x in self.scales):
            raise ConfigError(f"--matrix-lr-scales {args.matrix_lr_scales}: expected positive numbers, e.g. 1,0.5,0.25")

    def centre_lr(self, method: str) -> float:
        m = METHODS[method]
        if m.galore or m.centre:
            return self.args.galore_lr or self.preset.lrs.get(method, m.centre or GALORE_LR)
        return self.args.lr or self.preset.lrs.get(method, self.base.optim.lr)

    def initial_grid(self, method: str, chosen: dict) -> tuple[list, list]:
        """(lrs, matrix_lr_scales) a method starts from; scales [None]: the method's own recipe. The methods that
        inherit full-rank's chosen scale also centre their lrs on its chosen lr unless --lr or the preset names
        one (`chosen`: {method: (lr, scale)})."""
        n = self.lr_points if self.lr_sweep else 1
        inherit = inherits_scale(method) and chosen.get(SCALE_SWEPT)
        centre = (chosen[SCALE_SWEPT][0] if inherit and not (self.args.lr or method in self.preset.lrs)
                  else self.centre_lr(method))
        lrs = [centre * 2.0 ** (k - n // 2) for k in range(n)]
        if method == SCALE_SWEPT and self.scales:
            return lrs, list(self.scales)
        return lrs, [chosen[SCALE_SWEPT][1]] if inherit else [None]

    def phases(self) -> list[list]:
        """The methods in the order their lrs are chosen: full-rank first when others inherit its scale."""
        first = [m for m in self.methods if m == SCALE_SWEPT and self.scales]
        rest = [m for m in self.methods if m not in first]
        return [g for g in (first, rest) if g]

    def run(self, method: str, lr: float, seed: int, scale: float | None = None) -> dict:
        """One train_c4.py run; a reported seed (< TUNE_SEED0) is scored on the report slice of validation."""
        m = METHODS[method]
        opt = (["optim.name=galore_adamw", f"optim.galore_rank={self.galore_rank}",
                f"optim.galore_update_proj_gap={self.galore_gap}", "optim.galore_scale=0.25", *self.galore_eps]
               if m.galore else ["optim.name=adamw"])
        tune = seed >= TUNE_SEED0
        name = (method + (f"_lr{lr:.4g}" if self.lr_sweep else "") + ("" if scale is None else f"_m{scale:g}")
                + (f"_s{seed}" if len(self.seeds) > 1 or tune else ""))
        sets = self.common + opt + m.sets + self.per_method.get(method, []) + [
            f"optim.lr={lr!r}", f"train.seed={seed}", f"data.seed={seed}", f"velora.seed={seed}",
            f"train.max_steps={self.steps}", f"train.eval_every={self.eval_every}", f"train.save_every={self.steps}",
            f"train.log_every={max(1, min(10, self.steps // 20))}", "train.keep_last=1",
            f"train.output_dir={self.out / 'runs' / name}"]
        if scale is not None:
            sets.append(f"optim.matrix_lr_scale={scale!r}")
        if self.lr_sweep and not tune:          # the tuning runs scored the first slice: report on the next one
            sets.append(f"data.val_skip_tokens={self.base.data.val_tokens}")
        cmd = [sys.executable, "train_c4.py", "--config", self.config] + [a for s in sets for a in ("--set", s)]
        return {"name": name, "method": method, "label": m.label, "lr": lr, "scale": scale, "seed": seed,
                "phase": "tune" if tune else "report", "sets": sets, "config": self.config, "cmd": cmd,
                "run_dir": self.out / "runs" / name, "log": self.out / "logs" / f"{name}.log"}

    def facts(self) -> dict:
        argv = self.args.argv or []
        return {"config": self.config, "out": self.out, "steps": self.steps, "tokens_per_step": self.tokens_per_step,
                "tokens": self.steps * self.tokens_per_step, "galore_rank": self.galore_rank,
                "galore_gap": self.galore_gap, "base": self.base, "seeds": self.seeds, "lr_sweep": self.lr_sweep,
                "tune_seeds": self.tune_seeds, "scales": self.scales, "eval_every": self.eval_every,
                "preset": self.args.preset, "methods": self.methods,
                "references": {m: METHODS[m].reference for m in self.methods},
                "command": " ".join(shlex.quote(a) for a in ["scripts/compare_galore.sh"] + argv)}


def sweep(plan: Plan, pool, threads: int) -> list[tuple[dict, dict]]:
    """Choose every method's (lr, matrix lr scale) on the tuning seeds, phase by phase (Plan.phases); with
    --lr-sweep, extend a grid by a factor 2 beyond an edge while the best mean tuning loss sits there (at most
    6 extensions per method); then run each method's choice at every reported seed."""
    lock = threading.Lock()
    done, chosen = {}, {}

    def run_all(todo):
        for run, rec in zip(todo, pool.map(lambda r: execute(r, threads, lock), todo)):
            done[(run["method"], run["lr"], run["scale"], run["seed"])] = (run, rec)

    for group in plan.phases():
        grids = {m: plan.initial_grid(m, chosen) for m in group}
        for _ in range(7 if plan.lr_sweep else 0):
            todo = [plan.run(m, lr, s, sc) for m in group for lr in grids[m][0] for sc in grids[m][1]
                    for s in plan.tune_seeds if (m, lr, sc, s) not in done]
            if not todo:
                break
            run_all(todo)
            for m in group:
                grids[m] = _extend(grids[m], _best_point(done, m, plan.tune_seeds), m == SCALE_SWEPT and plan.scales)
        for m in group:
            chosen[m] = _best_point(done, m, plan.tune_seeds) if plan.lr_sweep else (grids[m][0][0], grids[m][1][0])
    run_all([plan.run(m, chosen[m][0], s, chosen[m][1]) for m in plan.methods if chosen[m] for s in plan.seeds])
    return list(done.values())


def _extend(grid: tuple[list, list], best: tuple | None, sweep_scale: bool) -> tuple[list, list]:
    """The grid with one more point beyond the edge the best point sits on (lower lrs when none finished)."""
    lrs, scales = grid
    if best is None:                                  # every lr diverged or failed: go lower
        return [min(lrs) / 2] + lrs, scales
    lr, scale = best
    if lr == min(lrs):
        lrs = [lr / 2] + lrs
    elif lr == max(lrs):
        lrs = lrs + [lr * 2]
    if sweep_scale and scale == min(scales):
        scales = [scale / 2] + scales
    elif sweep_scale and scale == max(scales):
        scales = scales + [scale * 2]
    return lrs, scales


def _best_point(done: dict, method: str, seeds: list) -> tuple | None:
    """The (lr, scale) with the lowest mean final tuning loss over `seeds`, or None when none finished."""
    from compare_report import point_means

    means = point_means([(r, read_log(r["run_dir"]) if rec["returncode"] == 0 else {})
                         for (m, _, _, s), (r, rec) in done.items() if m == method and s in seeds], len(seeds))
    finite = {p: v for p, v in means.items() if math.isfinite(v)}
    return min(finite, key=finite.get) if finite else None


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
    return {"params": sum(p.numel() for p in model.parameters()),
            "param_bytes": rep["parameters"], "grad_bytes": rep["gradients"],
            "optim_state_bytes": state_bytes(optimizer.state, set()),
            "saved_bytes_micro": rep["saved_total"] * micro / b, "saved_measured_batch": b, "micro_batch": micro,
            "saved_by_category_micro": {k: v * micro / b for k, v in rep["saved"].items()}}


def tabulate(plan: Plan, results: list, pool, measure_batch: int) -> list[dict]:
    """One row per run: its status, what it logged, the memory measured for its method and, for a reported run,
    its held-out score."""
    results = sorted(results, key=lambda x: (plan.methods.index(x[0]["method"]), x[0]["lr"], x[0]["scale"] or 0,
                                             x[0]["seed"]))
    report = [run for run, rec in results if run["phase"] == "report" and rec["returncode"] == 0]
    heldout = dict(zip((r["name"] for r in report),
                       pool.map(lambda r: score_heldout(r, plan.heldout_tokens), report)))
    rows, measured = [], {}
    for run, rec in results:
        status = "ok" if rec["returncode"] == 0 else "diverged" if rec.get("diverged") else "failed"
        row = {"name": run["name"], "method": run["method"], "label": run["label"], "lr": run["lr"],
               "scale": run["scale"], "seed": run["seed"], "phase": run["phase"], "status": status,
               "error": rec["error"] or "", "wall_s": rec["wall_s"],
               "command": " ".join(shlex.quote(a) for a in ["python"] + rec["cmd"])}
        if status == "ok":
            row.update(read_log(run["run_dir"]), **heldout.get(run["name"], {}))
            if run["method"] not in measured:
                try:
                    measured[run["method"]] = measure(run, measure_batch)
                except Exception as e:                   # a measurement failure is reported, not fatal
                    measured[run["method"]] = {"measure_error": f"{type(e).__name__}: {e}"}
                    print(f"[{run['method']}] memory measurement failed: {type(e).__name__}: {e}", flush=True)
            row.update(measured[run["method"]])
        rows.append(row)
    return rows


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
    from compare_regime import train_split_stats
    facts.update(train_split_stats(plan.base))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = tabulate(plan, sweep(plan, pool, threads), pool, args.measure_batch)
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
