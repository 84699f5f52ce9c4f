"""One run of the comparison (scripts/compare_galore.py): start train_c4.py (or reuse an identical finished run), read what it
logged, and score a reported run's final/ on ../shared/c4-heldout (scoring only)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
HELDOUT = REPO.parent / "shared" / "c4-heldout" / "c4-validation-heldout.json.gz"


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


def score_heldout(run: dict, tokens: int) -> dict:
    """Loss of a reported run's final/ on ../shared/c4-heldout (scoring only: nothing is chosen on it), cached in
    the run directory; {} when the held-out file is absent or the run did not finish."""
    final, cache = run["run_dir"] / "final", run["run_dir"] / "heldout.json"
    if not HELDOUT.is_file() or not final.is_dir() or tokens <= 0:
        return {}
    if not cache.is_file():
        cmd = [sys.executable, "scripts/eval_ppl.py", "--checkpoint", str(final), "--data", str(HELDOUT),
               "--split", "all", "--skip-tokens", "0", "--max-tokens", str(tokens), "--device", "cpu", "--json"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode:
            return {"heldout_error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        cache.write_text(proc.stdout.strip().splitlines()[-1] + "\n")
    rec = json.loads(cache.read_text())
    return {"heldout_loss": rec["loss"], "heldout_ppl": rec["ppl"], "heldout_tokens": rec["tokens"]}


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
