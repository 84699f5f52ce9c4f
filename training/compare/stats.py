"""What the comparison's (scripts/compare_galore.py) results allow one to say: paired t intervals over seeds, the three
verdicts, and the two gates that must pass before any verdict is drawn.

A method is judged against its control (full-rank trained with the same lr recipe) by the per-seed
differences of their final validation losses, `loss(method) - loss(control)` in nats: the log of the
perplexity ratio. Seeds pair the runs (same initial weights, data order and codec noise), so the
difference's spread over seeds is what measures the noise."""
from __future__ import annotations

import math
import statistics

NO_COST = math.log(1.01)          # "no measurable cost": the interval's upper bound is at most a 1% ppl cost
SPREAD_LIMIT = 0.02               # gate (a): full-rank's seed standard deviation of final loss, nats
GALORE_WIN_LIMIT = math.log(0.98)  # gate (b): GaLore may not beat tuned full-rank by more than 2% in ppl
# Two-sided 95% Student t quantiles, t_{0.975}(df), for df = 1..30
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """t_{0.975} with `df` degrees of freedom: the table to 30, beyond it the Cornish-Fisher expansion
    around the normal quantile (within 1e-3 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(diffs: list) -> dict | None:
    """Mean of `diffs` and its 95% t interval (df = n - 1); None with fewer than two values."""
    n = len(diffs)
    if n < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd}


def ratio_text(ci: dict) -> str:
    """'1.034× (95% interval 1.012–1.057×, n seeds)': the loss difference as a perplexity ratio."""
    return (f"{math.exp(ci['mean']):.3f}× (95% interval {math.exp(ci['lo']):.3f}–{math.exp(ci['hi']):.3f}×, "
            f"{ci['n']} seeds)")


def verdict(diffs: list) -> tuple[str, str]:
    """(kind, text) for per-seed loss differences method - control. Exactly three kinds:
    "no measurable cost" (upper bound <= ln 1.01), "costs" (lower bound > 0), "inconclusive" (otherwise,
    and with fewer than two seeds)."""
    ci = interval(diffs)
    if ci is None:
        return "inconclusive", f"inconclusive ({len(diffs)} paired seed(s): no interval)"
    if ci["hi"] <= NO_COST:
        return "no measurable cost", f"no measurable cost: {ratio_text(ci)}"
    if ci["lo"] > 0:
        return "costs", f"costs {ratio_text(ci)}"
    return "inconclusive", f"inconclusive: {ratio_text(ci)}"


def seed_spread(losses: list) -> float:
    """The seed spread of final losses: their sample standard deviation (n - 1), nats; nan below two."""
    return statistics.stdev(losses) if len(losses) > 1 else math.nan


def gate_spread_and_grid(controls: dict, grids: dict) -> tuple[bool, list[str]]:
    """Gate (a). `controls`: {method: final losses over the reported seeds} of the full-rank controls;
    `grids`: {method: None when its lr was not swept, else a list of reasons its best point sits on an edge
    of its grid (empty: strictly inside)}. Passes when every control's seed spread is <= SPREAD_LIMIT and
    every method's best lr (and matrix_lr_scale, where swept) lies strictly inside its grid."""
    notes, ok = [], True
    for m, losses in controls.items():
        sd = seed_spread(losses)
        good = sd <= SPREAD_LIMIT             # nan (one seed) fails: no spread is known
        ok &= good
        shown = (f"{sd:.4f} nats " + ("≤" if good else "**exceeds**") + f" {SPREAD_LIMIT}" if math.isfinite(sd)
                 else "**unknown** (fewer than two seeds)")
        notes.append(f"{m}: seed spread (std of final loss over {len(losses)} seeds) {shown}")
    if not controls:
        ok = False
        notes.append("no full-rank control completed: its seed spread is unknown")
    for m, edges in grids.items():
        if edges is None:
            ok = False
            notes.append(f"{m}: lr **not swept**, so nothing shows it is tuned")
        elif edges:
            ok = False
            notes.append(f"{m}: best point **not strictly inside** its grid ({'; '.join(edges)})")
    if grids and all(e == [] for e in grids.values()):
        notes.append(f"every best lr lies strictly inside its grid ({len(grids)} methods)")
    return ok, notes


def gate_galore(diffs: list | None) -> tuple[bool, str]:
    """Gate (b): per-seed loss differences GaLore - tuned full-rank. Fails when GaLore's mean ratio is below
    0.98 (published tuned comparisons never show GaLore ahead by that much: the baseline or the regime is
    wrong). None (no GaLore or no full-rank): not checked, passes, and says so."""
    if not diffs:
        return True, "not checked (no GaLore run paired with full-rank)"
    mean = statistics.fmean(diffs)
    ci = interval(diffs)
    shown = ratio_text(ci) if ci else f"{math.exp(mean):.3f}× (1 seed)"
    if mean < GALORE_WIN_LIMIT:
        return False, f"GaLore / tuned full-rank {shown}: GaLore **beats** full-rank by more than 2%"
    return True, f"GaLore / tuned full-rank {shown}: not a win of more than 2%"
