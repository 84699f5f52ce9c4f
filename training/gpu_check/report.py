"""Sections under time budgets, and the JSON + Markdown written after each of them.

A section is a function `fn(record, budget)` that fills `record` (a dict: scalar fields, and `rows`, a list
of dicts, one table row each). It checks `budget` (a Budget) between its units of work and skips what no
longer fits; a SIGALRM GRACE_S after the deadline interrupts a unit that overruns it. Any exception ends
only that section: its status, the error line and whatever rows it had are kept, and the next section
starts.
"""
from __future__ import annotations

import json
import math
import signal
import time
import traceback
from pathlib import Path

GRACE_S = 20.0                      # past a section's deadline before the alarm interrupts it


class SectionTimeout(Exception):
    """Raised by the alarm in a section that overran its deadline by GRACE_S."""


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


class Budget:
    """Time left until a deadline (perf_counter seconds)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def spent(self, reserve_s: float = 0.0) -> bool:
        return self.left() <= reserve_s


def _alarm(signum, frame):
    raise SectionTimeout(f"section ran {GRACE_S:g} s past its time budget")


class Report:
    """Runs the sections in order and rewrites `<out>/<stem>.json` and `.md` after each one (and on
    `save()`), so a run cut short still leaves everything it measured."""

    def __init__(self, out: Path, meta: dict, budget_s: float, stem: str = "bench_gpu"):
        self.out, self.meta, self.stem = Path(out), meta, stem
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.sections: dict[str, dict] = {}

    def run(self, name: str, fn, share_end: float) -> dict:
        """Run section `name`, which must finish by `share_end` x the total budget from the start."""
        deadline = self.t0 + share_end * self.budget_s
        record = {"status": "running", "budget_s": round(deadline - time.perf_counter(), 1), "rows": []}
        self.sections[name] = record
        started = time.perf_counter()
        if deadline - started <= 0:
            record.update(status="skipped", note="no time left in the run's budget")
            self.save()
            return record
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, deadline - started + GRACE_S)
        try:
            fn(record, Budget(deadline))
            record["status"] = "ok"
        except Exception as e:                # one broken section must not cost the others
            record.update(status="timeout" if isinstance(e, SectionTimeout) else "error", error=one_line(e),
                          traceback=traceback.format_exc(limit=8)[-3000:])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            record["wall_s"] = round(time.perf_counter() - started, 2)
            self.save()
        return record

    def save(self) -> str:
        """Write the JSON and the Markdown; return the Markdown."""
        self.meta["wall_s"] = round(time.perf_counter() - self.t0, 2)
        doc = {"meta": self.meta, "sections": self.sections}
        (self.out / f"{self.stem}.json").write_text(json.dumps(_finite(doc), indent=1) + "\n")
        text = markdown(doc)
        (self.out / f"{self.stem}.md").write_text(text)
        return text


def _finite(x):
    """JSON without NaN/inf: non-finite floats become their string."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def cell(v) -> str:
    """One Markdown table cell: None -> n/a, floats to 4 significant digits, lists joined."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return " ".join(cell(x) for x in v)
    return str(v).replace("|", "/").replace("\n", " ")


def table(rows: list[dict]) -> list[str]:
    """Markdown table of `rows`, columns in order of first appearance (dict values left out)."""
    cols = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, dict)]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    return lines + ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]


def markdown(doc: dict) -> str:
    """Every section: a status line, its scalar fields, and its rows as a table."""
    meta = doc["meta"]
    lines = [f"# GPU check ({'smoke, CPU' if meta.get('smoke') else meta.get('device', '?')})", "",
             f"Command: `{meta.get('command', '')}`; wall {meta.get('wall_s')} s of a {meta.get('budget_s')} s budget.",
             ""] + [f"- {k}: {cell(v)}" for k, v in meta.items() if k not in ("command", "wall_s", "budget_s")] + [""]
    for name, rec in doc["sections"].items():
        lines.append(f"## {name}: {rec['status']} ({rec.get('wall_s', '?')} s of {rec.get('budget_s')} s)")
        if rec.get("error"):
            lines.append(f"error: `{rec['error']}`")
        scalars = {k: v for k, v in rec.items()
                   if k not in ("status", "wall_s", "budget_s", "rows", "error", "traceback")
                   and not isinstance(v, (list, dict))}
        lines += [f"- {k}: {cell(v)}" for k, v in scalars.items()]
        if rec.get("rows"):
            lines += [""] + table(rec["rows"])
        lines.append("")
    return "\n".join(lines)
