"""The runs of one comparison and how its lrs are chosen: one train_c4.py command per (method, lr, matrix lr
scale, seed), the lr sweep on tuning seeds, then the table of every run with its memory and held-out score."""
from __future__ import annotations

import math
import shlex
import sys
import threading
from pathlib import Path

from common.errors import ConfigError
from ..config import load_config, resolve_batch
from ..methods import COMPARED, METHODS
from ..plan import measure_run
from .presets import C4_SAMPLE, GALORE_LR, PRESETS, SP_32K
from .report import point_means
from .runs import execute, read_log, score_heldout

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
            if name not in COMPARED or not override:
                raise ConfigError(f"--method-set {item!r}: expected METHOD:SECTION.KEY=VALUE with METHOD one of "
                                  f"{', '.join(COMPARED)}")
            self.per_method.setdefault(name, []).append(override)
        self.methods = [m.strip() for m in (args.methods or ",".join(pre.methods)).split(",") if m.strip()]
        for m in self.methods:
            if m not in COMPARED:
                raise ConfigError(f"--methods: unknown method {m!r}; choose from {', '.join(COMPARED)}")
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
    means = point_means([(r, read_log(r["run_dir"]) if rec["returncode"] == 0 else {})
                         for (m, _, _, s), (r, rec) in done.items() if m == method and s in seeds], len(seeds))
    finite = {p: v for p, v in means.items() if math.isfinite(v)}
    return min(finite, key=finite.get) if finite else None


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
                    measured[run["method"]] = measure_run(run, measure_batch)
                except Exception as e:                   # a measurement failure is reported, not fatal
                    measured[run["method"]] = {"measure_error": f"{type(e).__name__}: {e}"}
                    print(f"[{run['method']}] memory measurement failed: {type(e).__name__}: {e}", flush=True)
            row.update(measured[run["method"]])
        rows.append(row)
    return rows
