"""scripts/bench_gpu.py (training/gpu_check/): the --smoke run on CPU covers every section and field; the
section runner survives failures and overruns; the gate's verdicts; the micro-batch search; bad input."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.config import load_config
from training.gpu_check import gate, report
from training.gpu_check.methods import CODEC_VARIANTS, codec_variants, method_variants, planned_peak
from training.gpu_check.perf import largest_fitting
from velora.config import CODECS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_gpu.py"
TINY = str(REPO / "configs" / "llama_tiny.json")
SECTIONS = ["environment", "gate", "memory", "speed", "max_batch", "profile"]
METHODS = ["full_rank", "sr2_all", "velora_all", "sr2_all_memopts", "velora_all_memopts"]


@pytest.mark.slow
def test_smoke_runs_every_section_and_writes_every_field(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "OUT"}, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "bench_gpu.json").read_text())
    sec = doc["sections"]
    assert list(sec) == SECTIONS and all(s["status"] == "ok" for s in sec.values()), \
        {k: (s["status"], s.get("error")) for k, s in sec.items()}
    assert doc["meta"]["smoke"] and doc["meta"]["wall_s"] < wall and doc["meta"]["galore"]

    e = sec["environment"]
    for key in ("device", "driver", "capability", "gpu_memory_gib", "python", "torch", "cuda", "cudnn", "deepspeed",
                "triton", "sdpa_backend", "sdpa_enabled", "matmul_allow_tf32",
                "cudnn_allow_tf32", "float32_matmul_precision", "codec_variants"):
        assert key in e, key
    assert e["device"] == "CPU" and e["sdpa_backend"]

    variants, _ = codec_variants(TINY)
    rows = sec["gate"]["rows"]
    assert [r["case"] for r in rows] == [c.name for c in gate.gate_cases(CODECS, variants)]
    assert len(rows) == 6 + len(CODECS) * len(variants)
    for r in rows:   # on CPU every case runs, tracks fp32 and resumes bitwise
        assert r["status"] == "ok" and r["passed"] and r["resume_bitwise"], r
        assert all(math.isfinite(x) for x in r["bf16_losses"] + r["fp32_losses"])
    assert sec["gate"]["passed"] == len(rows) and sec["gate"]["failed"] == 0

    mem = sec["memory"]["rows"]
    assert [r["method"] for r in mem] == METHODS
    for r in mem:   # on CPU the engine's saved bytes are the CPU accounting's (which also sees v's first init)
        assert r["status"] == "ok" and r["saved_mib"] > 0 and r["saved_ratio"] == pytest.approx(1.0, abs=1e-4), r
        assert r["planned_peak_gib"] > 0 and r["peak_alloc_gib"] is None     # the planner's; no GPU to hold it against
    assert mem[1]["saved_mib"] < mem[0]["saved_mib"] and mem[3]["saved_mib"] < mem[1]["saved_mib"]

    speed = sec["speed"]["rows"]
    runs = method_variants({m: [] for m in METHODS[:1]} | {m: ["velora.targets=all"] for m in METHODS[1:]}, variants)
    assert [(r["size"], r["method"]) for r in speed] == [(s, m) for s in ("toy", "toy-b2") for m, _, _ in runs]
    for r in speed:
        assert r["status"] == "ok", r
        for key in ("step_ms", "full_rank_ms", "ratio_vs_full_rank", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)

    mb = sec["max_batch"]["rows"]
    assert [r["method"] for r in mb] == METHODS
    assert all(r["largest_fit"] == 16 and "search bound" in r["note"] for r in mb), mb

    prof = sec["profile"]["rows"]
    assert [r["method"] for r in prof] == ["full_rank"] * 10 + ["sr2_all"] * 10
    assert all(r["self_ms"] >= 0 and r["calls"] > 0 for r in prof)

    md = (tmp_path / "bench_gpu.md").read_text()
    for name in SECTIONS:
        assert f"## {name}: ok" in md
    assert "planned_peak_gib" in md
    assert proc.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])   # the Markdown is printed last


def test_sections_survive_errors_and_overruns(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "GRACE_S", 0.2)
    r = report.Report(tmp_path, {"smoke": True}, budget_s=3.0)

    def broken(rec, budget):
        rec["rows"].append({"case": "first"})
        raise ValueError("shapes do not match\nsecond line")

    def overrun(rec, budget):
        while True:
            time.sleep(0.05)

    def fine(rec, budget):
        rec["answer"] = 42
    assert r.run("a", broken, 0.3)["status"] == "error"
    assert r.run("b", overrun, 0.4)["status"] == "timeout"
    assert r.run("c", fine, 0.9)["status"] == "ok"
    doc = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert doc["sections"]["a"]["error"] == "ValueError: shapes do not match"
    assert doc["sections"]["a"]["rows"] == [{"case": "first"}]            # what a section had is kept
    assert doc["sections"]["c"]["answer"] == 42
    r.t0 -= 10                                                            # the run's budget is spent
    assert r.run("d", fine, 1.0)["status"] == "skipped"
    md = (tmp_path / "bench_gpu.md").read_text()
    assert "## a: error" in md and "## b: timeout" in md and "- answer: 42" in md and "## d: skipped" in md


def test_gate_verdicts():
    bf16 = {1: 6.0, 2: 5.9, 3: 5.8, 4: 5.7}
    fp32 = {1: 6.0, 2: 5.9, 3: 5.8, 4: 5.71}
    v = gate.compare(bf16, fp32, {3: 5.8, 4: 5.7}, exact_resume=True, rtol=2e-3)
    assert v["passed"] and v["resume_bitwise"] and v["max_rel_vs_fp32"] == pytest.approx(0.01 / 5.71)
    assert not gate.compare(bf16, fp32, {3: 5.8, 4: 5.7}, True, rtol=1e-3)["passed"]       # off the reference
    nearly = {3: 5.8, 4: 5.7 * (1 + 1e-4)}
    assert not gate.compare(bf16, fp32, nearly, exact_resume=True, rtol=2e-3)["resume_ok"]  # CPU: bitwise
    assert gate.compare(bf16, fp32, nearly, exact_resume=False, rtol=2e-3)["resume_ok"]     # CUDA: tolerance
    assert not gate.compare(bf16, fp32, {3: 5.8001, 4: 5.7}, False, 2e-3)["resume_ok"]     # first: bitwise
    assert not gate.compare({**bf16, 4: math.nan}, fp32, {3: 5.8}, True, 2e-3)["passed"]


def test_codec_variants_fall_back_when_the_config_lacks_the_key():
    variants, notes = codec_variants(TINY)
    try:
        load_config(TINY, list(CODEC_VARIANTS["fused"]))
        assert list(variants) == list(CODEC_VARIANTS) and not notes
    except Exception:
        assert variants == {"default": ()} and len(notes) == len(CODEC_VARIANTS)
        assert all("velora.fused" in n for n in notes)
    runs = method_variants({"full": [], "sr2": ["velora.setting=sr2_all"]}, {"x": ("a=1",), "y": ("a=2",)})
    assert runs == [("full", "", ()), ("sr2", "x", ("velora.setting=sr2_all", "a=1")),
                    ("sr2", "y", ("velora.setting=sr2_all", "a=2"))]
    assert planned_peak(load_config(TINY), 4) > planned_peak(load_config(TINY), 2) > 0


def test_largest_fitting_finds_the_oom_edge():
    fits_up_to = lambda edge: (lambda b: 1.0 if b <= edge else None)  # noqa: E731
    r = largest_fitting(fits_up_to(37), start=4, limit=4096, granularity=1, budget_s=60)
    assert (r["largest_fit"], r["first_oom"], r["note"]) == (37, 38, "")
    r = largest_fitting(fits_up_to(37), start=4, limit=4096, granularity=8, budget_s=60)
    assert r["largest_fit"] <= 37 < r["first_oom"] and r["first_oom"] - r["largest_fit"] <= 8
    r = largest_fitting(fits_up_to(2), start=4, limit=64, granularity=1, budget_s=60)
    assert (r["largest_fit"], r["first_oom"]) == (2, 3)
    r = largest_fitting(fits_up_to(0), start=4, limit=64, granularity=1, budget_s=60)
    assert r["largest_fit"] is None and r["first_oom"] == 1
    r = largest_fitting(fits_up_to(10**6), start=4, limit=64, granularity=1, budget_s=60)
    assert (r["largest_fit"], r["first_oom"], r["note"]) == (64, None, "search bound 64 reached")


def test_unknown_section_is_a_one_line_error():
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--sections", "gate,warp"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--sections: unknown section 'warp'; choose from environment,gate,memory,speed,max_batch,profile" in \
        p.stderr.strip().splitlines()[-1]


def test_the_gpu_plan_builds_every_run_config():
    # Everything the GPU run will load, loaded here: a config error must not first show on the lease.
    import bench_gpu

    sizes = bench_gpu.plan(smoke=False)
    variants, _ = codec_variants(bench_gpu.TINY_CONFIG)
    runs = method_variants(bench_gpu.METHODS, variants)
    for size in [sizes["memory"], *sizes["speed"], sizes["max_batch"], sizes["profile"]]:
        for _, _, sets in runs:
            cfg = size.run_config(sets)
            assert cfg.bf16 and cfg.deepspeed["train_micro_batch_size_per_gpu"] == size.micro_batch
            assert cfg.deepspeed["gradient_accumulation_steps"] == 1 and cfg.data.seq_len == 256
    assert [s.name for s in sizes["speed"]] == ["llama_60m", "llama_350m"] and sizes["max_batch"].name == "llama_350m"
    assert list(bench_gpu.SHARES) == SECTIONS and list(bench_gpu.SHARES.values()) == sorted(bench_gpu.SHARES.values())


def test_max_batch_search_rebuilds_an_engine_an_oom_broke(monkeypatch):
    import torch

    from training.gpu_check import perf
    from training.gpu_check.methods import Size

    built, broken = [], {"now": False}

    def step(engine, ids):
        if broken["now"]:                     # the step after an OOM fails: the engine is rebuilt, then steps
            broken["now"] = False
            raise RuntimeError("backward called twice")
        if ids.shape[0] > 37:
            broken["now"] = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(perf, "build", lambda cfg: built.append(cfg) or object())
    monkeypatch.setattr(perf, "step", step)
    size = Size("toy", TINY, 4, ("model.vocab_size=256", "data.seq_len=8", "model.max_sequence_length=8"))
    r = perf.max_batch_row(size, (), limit=4096, granularity=1, budget_s=60, device=torch.device("cpu"))
    assert (r["largest_fit"], r["first_oom"]) == (37, 38) and r["planned_peak_gib"] > 0
    # probes 4 8 16 32 64 (OOM) 48 (OOM) 40 (OOM) 36 38 (OOM) 37: each OOM broke the engine, rebuilt once
    assert r["probes"] == 10 and len(built) == 1 + 4


def test_speed_rows_record_an_oom_and_go_on(monkeypatch):
    import torch

    from training.gpu_check import perf
    from training.gpu_check.methods import Size

    def build(cfg):
        if cfg.velora.codec == "sr2":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return object()
    monkeypatch.setattr(perf, "build", build)
    monkeypatch.setattr(perf, "step", lambda engine, ids: None)
    size = Size("toy", TINY, 2, ("model.vocab_size=256", "data.seq_len=8", "model.max_sequence_length=8"))
    runs = [("full_rank", "", ()), ("sr2_all", "default", ("velora.targets=all", "velora.codec=sr2")),
            ("velora_all", "default", ("velora.targets=all",))]
    rec = {"rows": []}
    perf.speed_size(rec, report.Budget(time.perf_counter() + 60), torch.device("cpu"), size, runs,
                    {"rounds": 2, "warmup": 1}, lambda: None)
    assert [r["status"] for r in rec["rows"]] == ["ok", "OOM", "ok"]
    assert rec["rows"][1]["note"].startswith("OutOfMemoryError: CUDA out of memory")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_no_cuda_without_smoke_is_a_one_line_error():
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(
        "error: no CUDA device: run on a GPU machine, or with --smoke on CPU")


def test_a_failing_gate_case_keeps_its_log_and_the_next_one_runs(tmp_path):
    def fake_train(argv):
        sets = dict(a.split("=", 1) for a in argv[3::2] if "=" in a)
        if sets.get("optim.name") == "adafactor":
            raise RuntimeError("Tensors must be CUDA and dense\nmore")
        out = Path(sets["train.output_dir"])
        out.mkdir(parents=True)
        first = 3 if "--resume" in argv else 1
        lines = [json.dumps({"kind": "train", "step": s, "loss": 6.0 - 0.1 * s}) for s in range(first, gate.STEPS + 1)]
        (out / "train_log.jsonl").write_text("\n".join(lines) + "\n")
        return 0
    cases = [c for c in gate.gate_cases([], {}) if c.stage == 0]       # adamw, adafactor, galore_adamw
    rec = {"rows": []}
    gate.run_gate(rec, report.Budget(time.perf_counter() + 120), cases, fake_train, TINY, True, lambda: None,
                  tmp_path / "out")
    assert [r["status"] for r in rec["rows"]] == ["ok", "error", "ok"]
    assert rec["rows"][1]["note"] == "RuntimeError: Tensors must be CUDA and dense"
    assert "Traceback" in (tmp_path / "out" / rec["rows"][1]["log"]).read_text()
    assert (rec["passed"], rec["failed"]) == (2, 1) and "log" not in rec["rows"][0]


def test_speed_retries_a_size_at_half_the_batch_when_full_rank_does_not_fit(tmp_path, monkeypatch):
    import bench_gpu
    import torch

    from training.gpu_check import perf

    def speed_size(rec, budget, device, size, runs, opts, save):
        if size.micro_batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        rec["rows"].append({"size": size.name, "micro_batch": size.micro_batch, "status": "ok"})
    monkeypatch.setattr(perf, "speed_size", speed_size)
    monkeypatch.setattr(bench_gpu, "init_distributed", lambda: None)
    sizes = bench_gpu.plan(smoke=True)
    check = bench_gpu.GpuCheck(sizes, torch.device("cpu"), report.Report(tmp_path, {}, 60))
    rec = {"rows": []}
    check.speed(rec, report.Budget(time.perf_counter() + 60))
    assert [(r["size"], r["micro_batch"], r["status"]) for r in rec["rows"]] == [
        ("toy", 4, "OOM"), ("toy", 2, "ok"), ("toy-b2", 2, "ok")]
