"""The tables and the plot of scripts/compare_galore.py: results.csv (one row per run), results.md (one row
per method at its best lr: mean ± std over seeds, paired ratios to full-rank, whether a difference is
beyond the seed spread, whether the curves still cross) and plot.png."""
from __future__ import annotations

import csv
import datetime
import math
import platform
import statistics
from pathlib import Path

MIB = 2 ** 20
# Published validation perplexities for the same model sizes (not ours): GaLore paper (Zhao et al.,
# 2024) Table 2, 1.1B/2.2B/6.4B/13.1B training tokens for 60M/130M/350M/1B; VeLoRA's official
# repository README, 60M.
PUBLISHED = [("GaLore paper, Table 2", "full-rank", {"60m": 34.06, "130m": 25.08, "350m": 18.80, "1b": 15.56}),
             ("GaLore paper, Table 2", "GaLore", {"60m": 34.88, "130m": 25.36, "350m": 18.95, "1b": 15.64}),
             ("VeLoRA official repository README", "VeLoRA", {"60m": 33.28})]
CSV_FIELDS = ["name", "method", "label", "lr", "seed", "selected", "status", "error", "val_loss", "val_ppl",
              "val_galore_ppl", "ppl_vs_full_rank", "eval_tokens", "steps", "tokens_trained", "param_bytes",
              "grad_bytes", "optim_state_bytes", "saved_bytes_micro", "saved_vs_full_rank", "saved_measured_batch",
              "micro_batch", "peak_rss", "cuda_max_allocated", "cuda_max_reserved", "tokens_per_s", "step_time_s",
              "wall_s", "command"]
# Two-sided 95% Student t quantiles by degrees of freedom (a paired test over seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def lr_means(entries: list, n_seeds: int) -> dict:
    """{lr: mean final validation loss over the seeds} from (run, log) pairs of one method; inf where a seed
    diverged or failed; lrs whose seeds have not all run are left out."""
    by_lr = {}
    for run, log in entries:
        by_lr.setdefault(run["lr"], []).append(log.get("val_loss", math.inf))
    return {lr: (statistics.fmean(v) if all(math.isfinite(x) for x in v) else math.inf)
            for lr, v in by_lr.items() if len(v) == n_seeds}


def _mean_std(values: list) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def spread_verdict(ratios: list, limit: float = 1.0) -> str:
    """Whether paired per-seed ratios differ from `limit` beyond the seed spread (95% paired t interval)."""
    if len(ratios) < 2:
        return "one seed: spread unknown"
    mean, std = _mean_std(ratios)
    half = T95.get(len(ratios) - 1, 2.0) * std / math.sqrt(len(ratios))
    lo, hi = mean - half, mean + half
    if hi < limit:
        return f"below {limit:g} beyond the seed spread (95% interval {lo:.3f}–{hi:.3f})"
    if lo > limit:
        return f"above {limit:g} beyond the seed spread (95% interval {lo:.3f}–{hi:.3f})"
    return f"within the seed spread of {limit:g} (95% interval {lo:.3f}–{hi:.3f})"


def summarize(rows: list[dict], n_seeds: int, references: dict | None = None) -> list[dict]:
    """One dict per method at its best lr (lowest mean validation loss over all seeds), paired by seed against
    full-rank and, where `references` names another method (full-rank with the same lr recipe), against that."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        means = lr_means([(r, r) for r in mine], n_seeds)
        finite = {lr: v for lr, v in means.items() if math.isfinite(v)}
        s = {"method": m, "label": mine[0]["label"], "lrs": means, "rows": mine}
        if finite:
            best = min(finite, key=finite.get)
            sel = sorted((r for r in mine if r["lr"] == best), key=lambda r: r["seed"])
            for r in sel:
                r["selected"] = True
            s.update(best_lr=best, selected=sel, ppl=_mean_std([r["val_ppl"] for r in sel]),
                     galore_ppl=_mean_std([r["val_galore_ppl"] for r in sel]),
                     step_time=statistics.fmean(r["step_time_s"] for r in sel),
                     tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in sel),
                     edge=len(means) > 1 and best in (min(means), max(means)), **{k: sel[0].get(k) for k in (
                         "saved_bytes_micro", "param_bytes", "grad_bytes", "optim_state_bytes", "measure_error")})
            s["curve"] = _mean_curve(sel)
        out.append(s)
    done = {s["method"]: s for s in out if "best_lr" in s}
    ref = done.get("full_rank")
    for s in done.values():
        own = done.get((references or {}).get(s["method"], "full_rank"))
        if own is not None and own is not ref and own is not s:
            ratios = _paired(s, own)
            s["same_recipe"] = {"label": own["label"], "ratios": ratios, "ratio": _mean_std(ratios),
                                "verdict": spread_verdict(ratios)}
        full = ref or own            # full-rank saves the same bytes whatever its lr recipe
        if full is not None and s.get("saved_bytes_micro") and full.get("saved_bytes_micro"):
            s["saved_ratio"] = s["saved_bytes_micro"] / full["saved_bytes_micro"]
        if ref is None:
            continue
        by_seed = _ratios_by_seed(s, ref)
        s["ratios"] = list(by_seed.values())
        s["ratio"] = _mean_std(s["ratios"])
        s["verdict"] = spread_verdict(s["ratios"]) if s is not ref else ""
        s["step_time_ratio"] = s["step_time"] / ref["step_time"]
        for r in s["selected"]:
            r["ppl_vs_full_rank"] = by_seed.get(r["seed"], "")
            r["saved_vs_full_rank"] = s.get("saved_ratio", "")
    return out


def _ratios_by_seed(s: dict, ref: dict) -> dict:
    """{seed: perplexity of `s` / perplexity of `ref`}, each at its best lr, for the seeds both ran."""
    base = {r["seed"]: r["val_ppl"] for r in ref["selected"]}
    return {r["seed"]: r["val_ppl"] / base[r["seed"]] for r in s["selected"] if r["seed"] in base}


def _paired(s: dict, ref: dict) -> list:
    """Per-seed perplexity ratios of `s` to `ref` (the seeds both ran)."""
    return list(_ratios_by_seed(s, ref).values())


def _mean_curve(sel: list) -> list:
    """[(tokens, mean loss, std)] at the eval points every selected seed has."""
    curves = [dict(r.get("curve") or []) for r in sel]
    points = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [(t, *_mean_std([c[t] for c in curves])) for t in points]


def crossing(summary: list) -> str:
    """Where the order of the methods' mean validation losses last changed, from eval to eval, counting only
    pairs whose final perplexities differ beyond the seed spread (tied pairs may swap for ever)."""
    done = [s for s in summary if s.get("curve")]
    curves = {s["method"]: {t: mean for t, mean, _ in s["curve"]} for s in done}
    if len(curves) < 2:
        return "fewer than two methods with a curve: nothing to cross"
    points = sorted(set.intersection(*(set(c) for c in curves.values())))
    tied, last = [], 0
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            # tied: within the spread both ways round (a t interval on ratios is not symmetric);
            # one seed (spread unknown) counts every pair
            if all(spread_verdict(_paired(x, y)).startswith("within") for x, y in ((a, b), (b, a))):
                tied.append(f"{a['method']}/{b['method']}")
                continue
            ca, cb = curves[a["method"]], curves[b["method"]]
            final = ca[points[-1]] < cb[points[-1]]
            last = max([last] + [k + 1 for k in range(len(points) - 1) if (ca[points[k]] < cb[points[k]]) != final])
    note = f" (not counted, tied within the seed spread: {', '.join(tied)})" if tied else ""
    if last == 0:
        return f"the order of the mean validation losses is the same at all {len(points)} evaluations{note}"
    return (f"the order of the mean validation losses last changed at the evaluation after {points[last]:,.0f} "
            f"tokens ({points[last] / points[-1]:.0%} of the budget) and holds for the remaining "
            f"{len(points) - 1 - last} of {len(points)} evaluations{note}")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def _pm(pair, fmt=".2f") -> str:
    mean, std = pair
    return f"{mean:{fmt}}" + ("" if math.isnan(std) else f" ± {std:{fmt}}")


def _goals(summary: list) -> list[str]:
    """Issue 12's goals for every compressing method, from the measured bytes and the paired ratios."""
    out = []
    for s in summary:
        if not ("ratio" in s or "same_recipe" in s) or s.get("saved_ratio") is None or s["saved_ratio"] >= 1:
            continue
        memopts = s["method"].endswith("memopts")
        limit = 0.50 if memopts else 0.85
        # a method with its own lr recipe is judged against full-rank trained with that recipe
        paired = s.get("same_recipe") or s
        against = f" to {paired['label']}" if paired is not s else ""
        mem_ok, ppl_ok = s["saved_ratio"] <= limit, paired["ratio"][0] <= 1.01
        verdict = "met" if mem_ok and ppl_ok else "**missed**"
        out.append(f"- {s['label']}: saved bytes {s['saved_ratio']:.3f} (goal ≤ {limit:.2f}{' with memory options' if memopts else ''}), "
                   f"ppl ratio{against} {_pm(paired['ratio'], '.3f')} (goal ≤ 1.01; "
                   f"{spread_verdict(paired['ratios'], 1.01)}) — {verdict}.")
    return out or ["- No compressing method completed with a full-rank run to pair it with."]


def write_markdown(rows: list[dict], summary: list, facts: dict, path: Path) -> None:
    base, m = facts["base"], facts["base"].model
    gpu = any("cuda_max_allocated" in r for r in rows)
    seeds = facts["seeds"]
    lines = [
        f"### {Path(facts['config']).name}, preset `{facts['preset']}`: {facts['tokens']:,} tokens per run, "
        f"{len(seeds)} seed(s){', lr swept' if facts['lr_sweep'] else ''}",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} ({'GPU' if gpu else 'CPU'}), with:",
        "",
        f"`{facts['command']}`",
        "",
        f"Model: hidden {m.hidden_size}, intermediate {m.intermediate_size}, {m.num_hidden_layers} layers, "
        f"{m.num_attention_heads} heads, vocab {m.vocab_size}. Data: `{base.data.source}`"
        + (f" (`{base.data.path}`)" if base.data.path else "") + f", tokenizer `{base.data.tokenizer}`, "
        f"packing `{base.data.packing}`, sequence {base.data.seq_len}, {facts['steps']} steps × "
        f"{facts['tokens_per_step']:,} tokens, seeds {', '.join(map(str, seeds))} (initial weights, data order and "
        f"codec noise), {base.optim.scheduler} schedule (warmup {base.optim.warmup_ratio:g}, min lr ratio "
        f"{base.optim.min_lr_ratio:g}), {'bf16' if base.deepspeed.get('bf16', {}).get('enabled') else 'fp32'}. "
        f"GaLore: rank {facts['galore_rank']}, update_proj_gap {facts['galore_gap']}, scale 0.25 (its recipe's two "
        f"parameter groups: one lr, the projected matrices' updates scaled by 0.25), ZeRO 0. VeLoRA: rank "
        f"{base.velora.rank}, sub_token_size {base.velora.sub_token_size or 'paper grouping'}"
        + (f", overrides {base.velora.sub_token_overrides}" if base.velora.sub_token_overrides else "")
        + f", init {base.velora.init}. Validation: the fixed slice of `data.val_tokens` = {base.data.val_tokens:,} "
        f"tokens; `ppl` is token-weighted.",
        "",
        "Per method, the lr with the lowest mean final validation loss over the seeds; ppl is mean ± std over "
        "the seeds at that lr; the ratio to full-rank is paired by seed (same initial weights and batches) and "
        "judged with a 95% paired t interval. Memory columns are exact tensor bytes measured in the driver "
        "(saved for backward per micro-batch with `velora.memory`; the optimizer's state after one real step). "
        + ("" if gpu else "Step times come from runs sharing a CPU and are not the step-time figure "
           "(`scripts/bench_velora.py time` interleaves the variants in one process)."),
        "",
        "| method | best lr | ppl | ppl / full-rank | vs full-rank | saved MiB / micro-batch | saved / full-rank | "
        "optimizer state MiB | step time / full-rank |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        if "best_lr" not in s:
            lines.append(f"| {s['label']} | – | no lr completed every seed | | | | | | |")
            continue
        edge = " (edge)" if s["edge"] else ""
        lines.append(
            f"| {s['label']} | {s['best_lr']:.4g}{edge} | {_pm(s['ppl'])} | "
            f"{_pm(s['ratio'], '.3f') if 'ratio' in s else '–'} | {s.get('verdict') or '–'} | "
            f"{(s.get('saved_bytes_micro') or 0) / MIB:.2f} | {s.get('saved_ratio', math.nan):.3f} | "
            f"{(s.get('optim_state_bytes') or 0) / MIB:.2f} | {s.get('step_time_ratio', math.nan):.3f} |")
    same = [s for s in summary if "same_recipe" in s]
    if same:
        lines += ["", "Paired by seed against full-rank trained with the same lr recipe:", ""] + [
            f"- {s['label']} / {s['same_recipe']['label']}: {_pm(s['same_recipe']['ratio'], '.3f')}, "
            f"{s['same_recipe']['verdict']}" for s in same]
    lines += ["", f"Curves: {crossing(summary)}.", ""]
    if facts["lr_sweep"]:
        part = facts.get("sweep_seeds", seeds)
        lines += ["Learning-rate sweep (mean validation ppl over the seeds per lr; `diverged` where a seed's loss "
                  "became non-finite)" + ("" if len(part) == len(seeds) else
                                          f"; the sweep ran seed(s) {', '.join(map(str, part))} only and the best "
                                          f"lr then ran at every seed, so other lrs' means cover fewer seeds")
                  + ":", ""]
        for s in summary:
            cells = []
            for lr in sorted({r["lr"] for r in s["rows"]}):
                runs = [r for r in s["rows"] if r["lr"] == lr]
                ok = [r["val_ppl"] for r in runs if r["status"] == "ok"]
                n = f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})" if len(runs) != len(seeds) else ""
                cells.append(f"{lr:.4g}: " + (f"{statistics.fmean(ok):.2f}{n}" if len(ok) == len(runs) else
                                              "diverged" if any(r["status"] == "diverged" for r in runs) else "failed"))
            lines.append(f"- {s['method']}: " + ", ".join(cells))
        lines.append("")
    lines += ["Goals (issue 12):", ""] + _goals(summary)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Runs that FAILED (for another reason than a diverged loss):", ""] + [
            f"- {r['name']}: {r['error']}" for r in failed]
    lines += ["", "Published validation perplexities (**not ours**: other tokens, tokenizer, data and budget — "
                  "context only):", "", "| source | method | 60M | 130M | 350M | 1B |", "|---|---|---:|---:|---:|---:|"]
    for src, method, vals in PUBLISHED:
        lines.append(f"| {src} (published) | {method} | "
                     + " | ".join(f"{vals[k]:.2f}" if k in vals else "–" for k in ("60m", "130m", "350m", "1b")) + " |")
    lines += ["", "The best-lr runs' exact commands (every run's command is in results.csv):", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for s in summary for r in s.get("selected", [])]
    path.write_text("\n".join(lines) + "\n")


def write_plot(summary: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in summary if s.get("curve")]
    rows = math.ceil(len(shown) / 3)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5.2 + 0.22 * rows))
    markers = "osD^vP*X<>h"
    cmap = plt.get_cmap("tab20")          # more methods than the default cycle's 10 colours
    for i, s in enumerate(shown):
        color, marker = (f"C{i}" if len(shown) <= 10 else cmap(i % 20)), markers[i % len(markers)]
        label = f"{s['label']} (lr {s['best_lr']:.3g})"
        t, mean, std = zip(*s["curve"])
        ax1.plot(t, mean, marker=marker, color=color, label=label, ms=4)
        if not math.isnan(std[0]):
            ax1.fill_between(t, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                             color=color, alpha=0.15)
        if s.get("saved_ratio") is not None:
            ax2.errorbar([s["saved_ratio"]], [s["ppl"][0]], yerr=[0 if math.isnan(s["ppl"][1]) else s["ppl"][1]],
                         fmt=marker, color=color, capsize=4, label=label)
        seed0 = {r["lr"]: r["val_loss"] for r in s["rows"] if r["seed"] == 0 and r["status"] == "ok"}
        if len(seed0) > 1:
            lrs = sorted(seed0)
            ax3.plot(lrs, [math.exp(seed0[lr]) for lr in lrs], marker=marker, color=color, label=s["label"])
    ax1.set(xlabel="training tokens (steps x batch x sequence)", ylabel="validation loss (mean ± std over seeds)", title="validation loss")
    ax2.set(xlabel="saved-for-backward bytes / full-rank", ylabel="validation perplexity (mean ± std)",
            title="perplexity vs saved activations")
    ax3.set(xscale="log", xlabel="learning rate", ylabel="validation perplexity, seed 0", title="lr sweep (seed 0)")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    # one legend for the three panels, below them (inside, it covers the curves)
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(rows: list[dict], facts: dict, out: Path) -> list[dict]:
    """results.csv, results.md and plot.png in `out`; returns the per-method summary."""
    summary = summarize(rows, len(facts["seeds"]), facts.get("references"))
    write_csv(rows, out / "results.csv")
    write_markdown(rows, summary, facts, out / "results.md")
    write_plot(summary, out / "plot.png")
    return summary
