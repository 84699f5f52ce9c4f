"""scripts/bench_gpu.py: the --smoke run on CPU, the micro-batch search, OOM handling, bad input."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_gpu.py"
CASE_NAMES = ["full-rank AdamW", "activation checkpointing", "VeLoRA paper", "VeLoRA all",
              "VeLoRA all + memory options", "GaLore AdamW", "VeLoRA all + GaLore"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_runs_every_case_and_writes_table_and_json(tmp_path):
    # Run as `python scripts/bench_gpu.py --smoke --out DIR`, then report which heavy packages it
    # imported: the lent GPU machine has neither DeepSpeed nor datasets.
    code = (f"import runpy, sys\nsys.argv = [{str(SCRIPT)!r}, '--smoke', '--out', {str(tmp_path)!r}]\n"
            f"try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
            f"    print('IMPORTED', [m for m in ('deepspeed', 'datasets') if m in sys.modules], file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "IMPORTED []" in proc.stderr, proc.stderr[-3000:]
    assert "SystemExit" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    data = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert "random token ids" in data["meta"]["data"]
    assert [c["case"] for c in data["cases"]] == CASE_NAMES
    for c in data["cases"]:
        assert c["status"] == "ok", c
        for key in ("step_ms", "tokens_per_s", "tflops", "mfu"):
            assert math.isfinite(c[key]) and c[key] > 0, (c["case"], key, c[key])
        assert c["micro_batch"] == 4 and c["timed_steps"] >= 2
    assert [m["case"] for m in data["max_batch"]] == ["full-rank AdamW", "VeLoRA all"]
    assert all(m["largest_fit"] == 16 and "search bound" in m["note"] for m in data["max_batch"])

    table = (tmp_path / "bench_gpu.md").read_text()
    for name in CASE_NAMES:
        assert f"| smoke-tiny | {name} | 4 |" in table
    # The table is printed last, so a truncated log still ends with it.
    assert proc.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])


def test_largest_fitting_finds_the_oom_edge(bench):
    fits_up_to = lambda edge: (lambda b: 1.0 if b <= edge else None)  # noqa: E731
    r = bench.largest_fitting(fits_up_to(37), start=4, limit=4096, granularity=1, budget_s=60)
    assert (r["largest_fit"], r["first_oom"], r["note"]) == (37, 38, "")
    r = bench.largest_fitting(fits_up_to(37), start=4, limit=4096, granularity=8, budget_s=60)
    assert r["largest_fit"] <= 37 < r["first_oom"] and r["first_oom"] - r["largest_fit"] <= 8
    r = bench.largest_fitting(fits_up_to(2), start=4, limit=64, granularity=1, budget_s=60)
    assert (r["largest_fit"], r["first_oom"]) == (2, 3)
    r = bench.largest_fitting(fits_up_to(0), start=4, limit=64, granularity=1, budget_s=60)
    assert r["largest_fit"] is None and r["first_oom"] == 1
    r = bench.largest_fitting(fits_up_to(10**6), start=4, limit=64, granularity=1, budget_s=60)
    assert (r["largest_fit"], r["first_oom"], r["note"]) == (64, None, "search bound 64 reached")


def _bench_that_fails(bench, monkeypatch, fail):
    b = bench.Bench(torch.device("cpu"), steps=2, warmup=1, case_budget_s=60, galore_cls=None)

    def measure(setup, case, batch):
        fail(batch)
        return {"status": "ok", "micro_batch": batch, "note": ""}
    monkeypatch.setattr(b, "measure", measure)
    return b


def test_run_case_halves_the_micro_batch_on_oom_and_records_errors(bench, monkeypatch):
    def oom_above_1(batch):
        if batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    r = _bench_that_fails(bench, monkeypatch, oom_above_1).run_case(bench.SMOKE_SETUP, bench.CASES[0])
    assert r["status"] == "ok" and r["micro_batch"] == 1 and "reduced 4 -> 1 (OOM)" in r["note"]

    def always_oom(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    r = _bench_that_fails(bench, monkeypatch, always_oom).run_case(bench.SMOKE_SETUP, bench.CASES[0])
    assert r == {"status": "OOM", "note": "out of memory down to micro-batch 1"}

    def broken(batch):
        raise ValueError("shapes do not match\nsecond line")
    r = _bench_that_fails(bench, monkeypatch, broken).run_case(bench.SMOKE_SETUP, bench.CASES[0])
    assert r == {"status": "error", "note": "ValueError: shapes do not match"}

    r = _bench_that_fails(bench, monkeypatch, broken).run_case(bench.SMOKE_SETUP, bench.CASES[5])
    assert r["status"] == "skipped" and "galore_torch" in r["note"]


def test_unknown_model_is_a_one_line_error(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--models", "llama_60m,llama_999m"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--models: unknown model 'llama_999m'; choose from llama_60m,llama_130m,llama_350m" in err
