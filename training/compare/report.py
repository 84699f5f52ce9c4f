"""The tables and the plot of scripts/compare_galore.py: results.csv (one row per run), results.md (the two
gates first, the regime, then one row per method at its chosen lr: every reported seed's final loss, the
paired verdict against its control on the report slice and on c4-heldout, whether the curves still cross)
and plot.png. The statistics are stats.py's, the regime block regime.py's."""
from __future__ import annotations

import csv
import datetime
import math
import platform
import statistics
from pathlib import Path

from . import stats
from .regime import regime_lines

MIB = 2 ** 20
# Published validation perplexities for the same model sizes (not ours): GaLore paper (Zhao et al.,
# 2024) Table 2, 1.1B/2.2B/6.4B/13.1B training tokens for 60M/130M/350M/1B; VeLoRA's official
# repository README, 60M.
PUBLISHED = [("GaLore paper, Table 2", "full-rank", {"60m": 34.06, "130m": 25.08, "350m": 18.80, "1b": 15.56}),
             ("GaLore paper, Table 2", "GaLore", {"60m": 34.88, "130m": 25.36, "350m": 18.95, "1b": 15.64}),
             ("VeLoRA official repository README", "VeLoRA", {"60m": 33.28})]
CSV_FIELDS = ["name", "method", "label", "phase", "lr", "scale", "seed", "selected", "status", "error", "val_loss",
              "val_ppl", "val_galore_ppl", "heldout_loss", "heldout_ppl", "escape_step", "eval_tokens", "steps",
              "tokens_trained", "params", "param_bytes", "grad_bytes", "optim_state_bytes", "saved_bytes_micro",
              "saved_vs_full_rank", "saved_measured_batch", "micro_batch", "peak_rss", "cuda_max_allocated",
              "cuda_max_reserved", "tokens_per_s", "step_time_s", "wall_s", "command"]


def point_means(entries: list, n_seeds: int) -> dict:
    """{(lr, matrix lr scale): mean final validation loss over the seeds} from (run, log) pairs of one
    method; inf where a seed diverged or failed; points whose seeds have not all run are left out."""
    by_point = {}
    for run, log in entries:
        by_point.setdefault((run["lr"], run.get("scale")), []).append(log.get("val_loss", math.inf))
    return {p: (statistics.fmean(v) if all(math.isfinite(x) for x in v) else math.inf)
            for p, v in by_point.items() if len(v) == n_seeds}


def _mean_std(values: list) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def grid_edges(points: list, best: tuple) -> list[str] | None:
    """Why `best` (lr, scale) is not strictly inside the grid of tried `points`: [] when it is; None when
    fewer than two lrs were tried (no sweep)."""
    lr, scale = best
    lrs = sorted({p[0] for p in points if p[1] == scale})
    if len({p[0] for p in points}) < 2:
        return None
    edges = [f"lr {lr:.4g} is the {'lowest' if lr == lrs[0] else 'highest'} tried"] if lr in (lrs[0], lrs[-1]) else []
    scales = sorted({p[1] for p in points if p[0] == lr and p[1] is not None})
    if len(scales) > 1 and scale in (scales[0], scales[-1]):
        edges.append(f"matrix_lr_scale {scale:g} is the {'lowest' if scale == scales[0] else 'highest'} tried")
    return edges


def _method_summary(m: str, mine: list, n_tune: int) -> dict:
    """A method's chosen point (from its tuning runs), its reported runs and their statistics."""
    tune = [r for r in mine if r.get("phase") == "tune"]
    report = sorted((r for r in mine if r.get("phase", "report") == "report"), key=lambda r: r["seed"])
    means = point_means([(r, r) for r in tune], n_tune)
    s = {"method": m, "label": mine[0]["label"], "means": means, "rows": mine, "selected": report}
    if not report:
        return s
    best = (report[0]["lr"], report[0].get("scale"))
    ok = [r for r in report if r["status"] == "ok"]
    for r in report:
        r["selected"] = True
    s.update(best=best, edges=grid_edges(list(means), best) if means else None,
             losses={r["seed"]: r["val_loss"] for r in ok},
             heldout={r["seed"]: r["heldout_loss"] for r in ok if r.get("heldout_loss") is not None},
             missing=[r["seed"] for r in report if r["status"] != "ok"])
    if ok:
        s.update(ppl=_mean_std([r["val_ppl"] for r in ok]), curve=_mean_curve(ok),
                 step_time=statistics.fmean(r["step_time_s"] for r in ok), **{k: ok[0].get(k) for k in (
                     "saved_bytes_micro", "param_bytes", "grad_bytes", "optim_state_bytes", "measure_error")})
    return s


def paired_diffs(a: dict, b: dict, key: str = "losses") -> list:
    """Per-seed loss differences a - b (nats: the log of the perplexity ratio), over the seeds both have."""
    return [a[key][seed] - b[key][seed] for seed in sorted(a.get(key, {})) if seed in b.get(key, {})]


def summarize(rows: list[dict], n_tune: int, references: dict | None = None) -> list[dict]:
    """One dict per method: its chosen point, reported runs and, against its control (`references`, default
    full-rank), the paired verdict on the report slice and on the held-out text."""
    out = [_method_summary(m, [r for r in rows if r["method"] == m], n_tune)
           for m in dict.fromkeys(r["method"] for r in rows)]
    done = {s["method"]: s for s in out if s.get("losses")}
    full = done.get("full_rank")
    for s in done.values():
        control = done.get((references or {}).get(s["method"], "full_rank"))
        if full is not None and "step_time" in s and "step_time" in full:
            s["step_time_ratio"] = s["step_time"] / full["step_time"]
        if full is not None and s.get("saved_bytes_micro") and full.get("saved_bytes_micro"):
            s["saved_ratio"] = s["saved_bytes_micro"] / full["saved_bytes_micro"]
            for r in s["selected"]:
                r["saved_vs_full_rank"] = s["saved_ratio"]
        if control is None or control is s:
            continue
        diffs = paired_diffs(s, control)
        s["control"] = control["method"]
        s["diffs"], s["ci"] = diffs, stats.interval(diffs)
        s["verdict"] = stats.verdict(diffs)
        if s["missing"]:
            s["verdict"] = ("inconclusive", f"inconclusive: seed(s) {', '.join(map(str, s['missing']))} did not "
                                            f"finish at the chosen lr")
        held = paired_diffs(s, control, "heldout")
        if held:
            s["heldout_verdict"] = stats.verdict(held)
    return out


def gates(summary: list, references: dict | None = None) -> list[tuple[str, bool, list[str]]]:
    """[(name, passed, notes)] of gate (a) (full-rank's seed spread, every best lr inside its grid) and gate (b)
    (GaLore not more than 2% better than tuned full-rank)."""
    done = {s["method"]: s for s in summary if s.get("losses")}
    controls = {c for c in ["full_rank", *(references or {}).values()] if c in done}
    grids = {s["method"]: s.get("edges") if "best" in s else ["no lr finished at the tuning seeds"] for s in summary}
    ok_a, notes_a = stats.gate_spread_and_grid({c: list(done[c]["losses"].values()) for c in sorted(controls)}, grids)
    lost = [f"{c}: seed(s) {', '.join(map(str, done[c]['missing']))} did not finish" for c in sorted(controls)
            if done[c]["missing"]]
    ok_a, notes_a = ok_a and not lost, notes_a + lost
    galore = done.get("galore")
    diffs = paired_diffs(galore, done["full_rank"]) if galore and "full_rank" in done else None
    ok_b, note_b = stats.gate_galore(diffs)
    return [("(a) seed spread and lr grids", ok_a, notes_a), ("(b) GaLore vs tuned full-rank", ok_b, [note_b])]


def _mean_curve(sel: list) -> list:
    """[(tokens, mean loss, std)] at the eval points every selected seed has."""
    curves = [dict(r.get("curve") or []) for r in sel]
    points = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [(t, *_mean_std([c[t] for c in curves])) for t in points]


def crossing(summary: list) -> str:
    """Where the order of the methods' mean validation losses last changed, from eval to eval, counting only
    pairs whose final losses differ beyond the seed spread (the paired 95% interval of their difference
    excludes 0; tied pairs may swap for ever; with one seed every pair counts)."""
    done = [s for s in summary if s.get("curve")]
    curves = {s["method"]: {t: mean for t, mean, _ in s["curve"]} for s in done}
    if len(curves) < 2:
        return "fewer than two methods with a curve: nothing to cross"
    points = sorted(set.intersection(*(set(c) for c in curves.values())))
    tied, last = [], 0
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            ci = stats.interval(paired_diffs(a, b))
            if ci is not None and ci["lo"] <= 0 <= ci["hi"]:
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


def _point(s: dict) -> str:
    lr, scale = s["best"]
    return f"{lr:.4g}" + ("" if scale is None else f" × {scale:g}") + (" (edge)" if s.get("edges") else "")


def gate_lines(gate_results: list) -> tuple[bool, list[str]]:
    """(all passed, the lines results.md opens with)."""
    passed = all(ok for _, ok, _ in gate_results)
    lines = (["**Gates passed**: verdicts are drawn below.", ""] if passed else
             ["**A gate FAILED: no verdict is drawn.** The comparison below is not evidence about the methods "
              "until the failing gate passes (see the notes).", ""])
    for name, ok, notes in gate_results:
        lines.append(f"- gate {name}: {'passed' if ok else '**FAILED**'}")
        lines += [f"  - {n}" for n in notes]
    return passed, lines + [""]


def _verdict_cells(s: dict, passed: bool) -> tuple[str, str]:
    if "verdict" not in s:
        return "control" if s.get("losses") else "–", "–"
    report = s["verdict"][1] if passed else ("withheld: " + stats.ratio_text(s["ci"]) if s.get("ci") else "withheld")
    held = s.get("heldout_verdict")
    held = "–" if held is None else held[1] if passed else "withheld"
    return report, held


def result_lines(summary: list, passed: bool, seeds: list) -> list[str]:
    """The per-method table (each method against its control) and every reported seed's final loss."""
    lines = ["| method | lr (× matrix lr scale) | ppl, report slice (mean ± std) | control | vs control, report "
             "slice | vs control, c4-heldout | saved / full-rank | optimizer state MiB | step time / full-rank |",
             "|---|---:|---:|---|---|---|---:|---:|---:|"]
    for s in summary:
        if not s.get("losses"):
            lines.append(f"| {s['label']} | – | no reported run finished | | | | | | |")
            continue
        report, held = _verdict_cells(s, passed)
        lines.append(f"| {s['label']} | {_point(s)} | {_pm(s['ppl'])} | {s.get('control', '–')} | {report} | {held} "
                     f"| {s.get('saved_ratio', math.nan):.3f} | {(s.get('optim_state_bytes') or 0) / MIB:.2f} | "
                     f"{s.get('step_time_ratio', math.nan):.3f} |")
    lines += ["", "Final validation loss (nats) of every reported run, report slice (c4-heldout in brackets):", "",
              "| method | " + " | ".join(f"seed {k}" for k in seeds) + " | mean ± std |",
              "|---|" + "---:|" * (len(seeds) + 1)]
    for s in summary:
        if not s.get("selected"):
            continue
        cells = []
        for k in seeds:
            loss, held = s.get("losses", {}).get(k), s.get("heldout", {}).get(k)
            cells.append("–" if loss is None else f"{loss:.4f}" + ("" if held is None else f" [{held:.4f}]"))
        vals = list(s.get("losses", {}).values())
        lines.append(f"| {s['method']} | " + " | ".join(cells) + f" | {_pm(_mean_std(vals), '.4f') if vals else '–'} |")
    return lines + [""]


def sweep_lines(summary: list, n_tune: int) -> list[str]:
    """The mean tuning loss of every point each method tried."""
    lines = [f"Tuning (mean final loss over the {n_tune} tuning seed(s), tuning slice; `diverged`/`failed` where a "
             f"seed did not finish; the chosen point in bold):", ""]
    for s in summary:
        if not s["means"]:
            continue
        cells = [(f"**{lr:.4g}" + ("" if sc is None else f" × {sc:g}") + f": {v:.4f}**" if (lr, sc) == s.get("best")
                  else f"{lr:.4g}" + ("" if sc is None else f" × {sc:g}") + ": " + (f"{v:.4f}" if math.isfinite(v)
                                                                                  else "diverged/failed"))
                 for (lr, sc), v in sorted(s["means"].items(), key=lambda x: (x[0][1] or 0, x[0][0]))]
        lines.append(f"- {s['method']}: " + ", ".join(cells))
    return lines + [""]


def _setup_line(facts: dict) -> str:
    base, m = facts["base"], facts["base"].model
    return (f"Model: hidden {m.hidden_size}, intermediate {m.intermediate_size}, {m.num_hidden_layers} layers, "
            f"{m.num_attention_heads} heads, vocab {m.vocab_size}. Data: `{base.data.source}`"
            + (f" (`{base.data.path}`)" if base.data.path else "") + f", tokenizer `{base.data.tokenizer}`, "
            f"packing `{base.data.packing}`, sequence {base.data.seq_len}, min lr ratio {base.optim.min_lr_ratio:g}, "
            f"{'bf16' if base.bf16 else 'fp32'}. GaLore: rank "
            f"{facts['galore_rank']}, update_proj_gap {facts['galore_gap']}, scale 0.25 (one lr, the projected "
            f"matrices' updates scaled by 0.25), ZeRO 0. VeLoRA: rank {base.velora.rank}, sub_token_size "
            f"{base.velora.sub_token_size or 'paper grouping'}"
            + (f", overrides {base.velora.sub_token_overrides}" if base.velora.sub_token_overrides else "")
            + f", init {base.velora.init}.")


def _protocol_line(facts: dict) -> str:
    val = facts["base"].data.val_tokens
    tune = facts.get("tune_seeds") or []
    chosen = (f"Each method's lr{' (and full-rank’s matrix_lr_scale)' if facts.get('scales') else ''} is chosen by "
              f"the lowest mean final loss of tuning seed(s) {', '.join(map(str, tune))} on the tuning slice (the "
              f"first {val:,} validation tokens); those runs are never reported. " if tune else
              "The lr was not swept (nothing shows it is tuned). ")
    where = f"the report slice (the next {val:,} validation tokens)" if tune else f"the first {val:,} validation tokens"
    return (chosen + f"Reported: seeds {', '.join(map(str, facts['seeds']))} (initial weights, data order and codec "
            f"noise) at the chosen point, scored on {where} and, "
            f"scoring only, on ../shared/c4-heldout where present. A method is judged against its control by the "
            f"per-seed differences of final loss (the log of the perplexity ratio) with a 95% t interval "
            f"(df = seeds − 1): *no measurable cost* when its upper bound is ≤ ln 1.01, *costs X* when its lower "
            f"bound is > 0, *inconclusive* otherwise. Memory columns are exact tensor bytes measured in the driver.")


def write_markdown(rows: list[dict], summary: list, facts: dict, path: Path) -> None:
    """results.md: the gates first (and no verdict when one fails), the regime, then the results."""
    gpu = any("cuda_max_allocated" in r for r in rows)
    passed, gate_text = gate_lines(gates(summary, facts.get("references")))
    lines = [f"### {Path(facts['config']).name}, preset `{facts['preset']}`: {facts['tokens']:,} tokens per run, "
             f"{len(facts['seeds'])} reported seed(s)", ""] + gate_text
    lines += regime_lines(rows, facts)
    lines += [f"Measured {datetime.date.today().isoformat()} on {platform.machine()} ({'GPU' if gpu else 'CPU'}), "
              f"with:", "", f"`{facts['command']}`", "", _setup_line(facts), "", _protocol_line(facts)
              + ("" if gpu else " Step times come from runs sharing a CPU, not the step-time figure "
                 "(`scripts/bench_velora.py time` interleaves the variants in one process)."), ""]
    lines += result_lines(summary, passed, facts["seeds"])
    lines += [f"Curves: {crossing(summary)}.", ""]
    if facts["lr_sweep"]:
        lines += sweep_lines(summary, len(facts.get("tune_seeds") or []))
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["Runs that FAILED (for another reason than a diverged loss):", ""] + [
            f"- {r['name']}: {r['error']}" for r in failed] + [""]
    lines += ["Published validation perplexities (**not ours**: other tokens, tokenizer, data and budget — "
              "context only):", "", "| source | method | 60M | 130M | 350M | 1B |", "|---|---|---:|---:|---:|---:|"]
    for src, method, vals in PUBLISHED:
        lines.append(f"| {src} (published) | {method} | "
                     + " | ".join(f"{vals[k]:.2f}" if k in vals else "–" for k in ("60m", "130m", "350m", "1b")) + " |")
    lines += ["", "The reported runs' exact commands (every run's command is in results.csv):", ""]
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
        label = f"{s['label']} (lr {_point(s)})"
        t, mean, std = zip(*s["curve"])
        ax1.plot(t, mean, marker=marker, color=color, label=label, ms=4)
        if not math.isnan(std[0]):
            ax1.fill_between(t, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                             color=color, alpha=0.15)
        if s.get("saved_ratio") is not None:
            ax2.errorbar([s["saved_ratio"]], [s["ppl"][0]], yerr=[0 if math.isnan(s["ppl"][1]) else s["ppl"][1]],
                         fmt=marker, color=color, capsize=4, label=label)
        tuned = {lr: v for (lr, sc), v in s["means"].items() if sc == s["best"][1] and math.isfinite(v)}
        if len(tuned) > 1:
            lrs = sorted(tuned)
            ax3.plot(lrs, [math.exp(tuned[lr]) for lr in lrs], marker=marker, color=color, label=s["label"])
    ax1.set(xlabel="training tokens (steps x batch x sequence)", ylabel="validation loss (mean ± std over seeds)", title="validation loss")
    ax2.set(xlabel="saved-for-backward bytes / full-rank", ylabel="validation perplexity (mean ± std)",
            title="perplexity vs saved activations")
    ax3.set(xscale="log", xlabel="learning rate", ylabel="tuning-slice perplexity (mean over tuning seeds)",
            title="lr sweep (at the chosen matrix lr scale)")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    # one legend for the three panels, below them (inside, it covers the curves)
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(rows: list[dict], facts: dict, out: Path) -> list[dict]:
    """results.csv, results.md and plot.png in `out`; returns the per-method summary."""
    summary = summarize(rows, len(facts.get("tune_seeds") or []), facts.get("references"))
    write_markdown(rows, summary, facts, out / "results.md")       # first: it sets each row's escape_step
    write_csv(rows, out / "results.csv")
    write_plot(summary, out / "plot.png")
    return summary
