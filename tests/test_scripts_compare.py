"""scripts/compare_galore.sh: every method of the quick preset end to end on a very small budget, a failing
method reported in its row, completed runs reused on a second call; on synthetic results: the lr chosen on
tuning seeds, the 2-D sweep of full-rank, each of the three verdicts, each of the two gates, results.md's
order, and the curve-crossing check."""
import csv
import math
import subprocess

import pytest

from conftest import REPO

from training.commands import compare as compare_galore
from training.compare import presets, sweep
from training.compare import report as compare_report
from training.compare import runs as compare_runs
from training.compare import stats as compare_stats
from training.methods import COMPARED, METHODS

# a 2-step budget on a 32-wide model (the quick preset's data and methods)
SMALL = ["--quick", "--tokens", "512", "--evals", "1", "--jobs", "2", "--measure-batch", "2",
         "--set", "model.hidden_size=32", "--set", "model.intermediate_size=86", "--set", "model.num_attention_heads=2",
         "--set", "data.seq_len=16", "--set", "data.val_tokens=512"]


@pytest.mark.slow
def test_compare_quick_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    cmd = ["bash", str(REPO / "scripts" / "compare_galore.sh"), *SMALL, "--out", str(out),
           "--method-set", "galore:optim.name=sgd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[full_rank] start:" in proc.stdout and "FAILED: galore" in proc.stdout

    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == set(presets.PRESETS["quick"].methods)
    bad = rows.pop("galore")
    assert bad["status"] == "failed" and "optim.name" in bad["error"] and "sgd" in bad["error"]
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["error"])
        for key in ("val_loss", "val_ppl", "val_galore_ppl", "saved_bytes_micro", "optim_state_bytes", "param_bytes",
                    "tokens_per_s", "step_time_s", "peak_rss", "wall_s"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (name, key, r[key])
        assert r["command"].startswith("python train_c4.py --config configs/llama_tiny.json")
        if compare_runs.HELDOUT.is_file():                       # scored once on the held-out text
            assert math.isfinite(float(r["heldout_loss"])) and float(r["heldout_loss"]) > 0, name
        assert (out / "logs" / f"{name}.log").is_file()
    # exact bytes: activation checkpointing and VeLoRA + memory options save less than full-rank
    assert float(rows["full_rank_ckpt"]["saved_vs_full_rank"]) < 1
    assert float(rows["velora_all_memopts"]["saved_bytes_micro"]) < float(rows["velora_all"]["saved_bytes_micro"])
    # GaLore's low-rank moments are smaller than AdamW's
    assert float(rows["velora_all_galore"]["optim_state_bytes"]) < float(rows["velora_all"]["optim_state_bytes"])

    md = (out / "results.md").read_text()
    assert "FAILED" in md and "34.06" in md and "33.28" in md and "scripts/compare_galore.sh --quick" in md
    # no lr sweep, one seed: gate (a) fails first, and no verdict is drawn
    assert md.split("\n")[2].startswith("**A gate FAILED: no verdict is drawn.**") and "not swept" in md
    import matplotlib.image
    assert matplotlib.image.imread(out / "plot.png").shape[0] > 100

    # the same command again: completed runs are reused, only the failed one runs again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1
    assert again.stdout.count("reusing the completed run") == len(rows)
    assert "[galore] start:" in again.stdout


def test_compare_bad_arguments(capsys):
    assert compare_galore.main(["--quick", "--methods", "full_rank,nope", "--out", "/nonexistent/x"]) == 2
    assert "--methods: unknown method 'nope'" in capsys.readouterr().err
    assert compare_galore.main(["--quick", "--method-set", "galore=lr", "--out", "/nonexistent/x"]) == 2
    assert "--method-set 'galore=lr'" in capsys.readouterr().err
    assert compare_galore.main(["--preset", "cpu", "--matrix-lr-scales", "1,-0.5", "--out", "/nonexistent/x"]) == 2
    assert "--matrix-lr-scales 1,-0.5: expected positive numbers" in capsys.readouterr().err


CENTRE = 0.001


def _fake_sweep(monkeypatch, tmp_path, *argv):
    """compare_galore.sweep with fake runs whose loss is a parabola in log2(lr) (minimum at 4x the centre) and
    in log2(matrix_lr_scale) (minimum at 0.5)."""
    def fake_execute(run, threads, lock):
        return {"cmd": run["cmd"][1:], "returncode": 0, "wall_s": 1.0, "error": None, "diverged": False}

    monkeypatch.setattr(sweep, "execute", fake_execute)
    monkeypatch.setattr(sweep, "read_log", _fake_log)
    args = compare_galore.parse_args(["--quick", "--methods", "full_rank", "--lr-sweep", "--lr", str(CENTRE),
                                      "--out", str(tmp_path), *argv])
    args.argv = []
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        return sweep.sweep(sweep.Plan(args), pool, 1)


def _fake_log(run_dir):
    lr = float(run_dir.name.split("_lr")[1].split("_")[0])
    scale = float(run_dir.name.split("_m")[1].split("_")[0]) if "_m" in run_dir.name else 0.5
    seed = int(run_dir.name.rsplit("_s", 1)[1])
    loss = 4.0 + (math.log2(lr / CENTRE) - 2) ** 2 * 0.01 + (math.log2(scale) + 1) ** 2 * 0.01 + 0.001 * (seed % 7)
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_galore_ppl": math.exp(loss), "step_time_s": 1.0,
            "tokens_per_s": 1.0, "curve": [(100, loss + 1), (200, loss)]}


def _rows(done):
    return [{"method": r["method"], "label": r["label"], "lr": r["lr"], "scale": r["scale"], "seed": r["seed"],
             "phase": r["phase"], "status": "ok", **_fake_log(r["run_dir"])} for r, _ in done]


def test_lr_chosen_on_tuning_seeds_then_run_at_the_reported_seeds(monkeypatch, tmp_path):
    """The 5-point grid (centre/4 .. centre*4) has its best at the upper edge, so the sweep adds 8x, finds 4x
    interior and stops; it runs at tuning seed 1000 only, the reported seeds run the chosen lr only, scored on
    the report slice (data.val_skip_tokens)."""
    done = _fake_sweep(monkeypatch, tmp_path, "--seeds", "3", "--tune-seeds", "1")
    tune = [r for r, _ in done if r["phase"] == "tune"]
    report = [r for r, _ in done if r["phase"] == "report"]
    assert {r["seed"] for r in tune} == {1000} and sorted(r["lr"] for r in tune) == [CENTRE * 2.0 ** k
                                                                                    for k in range(-2, 4)]
    assert sorted(r["seed"] for r in report) == [0, 1, 2] and {r["lr"] for r in report} == {CENTRE * 4}
    assert all("data.val_skip_tokens=16384" in r["sets"] for r in report)
    assert not any(s.startswith("data.val_skip_tokens") for r in tune for s in r["sets"])
    summary = compare_report.summarize(_rows(done), 1)
    assert summary[0]["best"] == (CENTRE * 4, None) and summary[0]["edges"] == []


def test_full_rank_tuned_over_both_lrs_and_the_codecs_inherit_its_scale(monkeypatch, tmp_path):
    done = _fake_sweep(monkeypatch, tmp_path, "--methods", "full_rank,sr2_all", "--seeds", "2", "--lr-points", "3",
                       "--matrix-lr-scales", "0.25,0.125")
    grid = {(r["lr"], r["scale"]) for r, _ in done if r["method"] == "full_rank" and r["phase"] == "tune"}
    assert {sc for _, sc in grid} == {0.125, 0.25, 0.5, 1.0}   # extended twice past the upper edge: 0.5 inside
    report = {(r["method"], r["scale"]) for r, _ in done if r["phase"] == "report"}
    assert report == {("full_rank", 0.5), ("sr2_all", 0.5)}
    summary = compare_report.summarize(_rows(done), 1)
    assert summary[0]["best"] == (CENTRE * 4, 0.5) and summary[0]["edges"] == []


def _report_rows(method, losses, lr=0.01, heldout=None):
    """Reported runs of one method with these final losses by seed, and a 3-point tuning grid around `lr`."""
    rows = [{"name": f"{method}_s{s}", "command": "python train_c4.py", "method": method, "label": method, "lr": lr,
             "scale": None, "seed": s, "phase": "report", "status": "ok", "val_loss": v, "val_ppl": math.exp(v), "val_galore_ppl": 1.0, "step_time_s": 1.0,
             "tokens_per_s": 1.0, "curve": [(k * 204_800, v + 1.5 - 0.5 * k) for k in (1, 2, 3)],
             **({} if heldout is None else {"heldout_loss": heldout[s]})} for s, v in enumerate(losses)]
    rows += [{"method": method, "label": method, "lr": lr * f, "scale": None, "seed": 1000, "phase": "tune",
              "status": "ok", "val_loss": 4.0 + abs(math.log2(f)) * 0.05} for f in (0.5, 1, 2)]
    return rows


FULL = [4.000, 4.010, 3.990, 4.005, 3.995]


def test_three_verdicts():

    def verdict_of(deltas):
        rows = _report_rows("full_rank", FULL) + _report_rows("m", [a + d for a, d in zip(FULL, deltas)])
        return compare_report.summarize(rows, 1)[1]["verdict"]

    kind, text = verdict_of([0.001, -0.002, 0.0, 0.002, -0.001])        # tight around 0: at most 1% ruled out
    assert kind == "no measurable cost" and text.startswith("no measurable cost: 1.000×")
    kind, text = verdict_of([0.03, 0.035, 0.025, 0.032, 0.028])          # clearly above 0
    assert kind == "costs" and text.startswith("costs 1.030× (95% interval 1.0")
    kind, text = verdict_of([0.05, -0.04, 0.02, -0.03, 0.01])           # wide: neither
    assert kind == "inconclusive"
    # the interval is a t interval with df = n - 1 on the loss differences
    ci = compare_stats.interval([0.01, 0.02, 0.03])
    assert ci["hi"] - ci["mean"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert compare_stats.t975(60) == pytest.approx(2.000, abs=1e-3) and compare_stats.t975(5) == 2.571
    assert compare_stats.verdict([0.01])[0] == "inconclusive"
    # an upper bound just above ln 1.01 is not "no measurable cost"
    assert compare_stats.verdict([0.0105, 0.0095, 0.01])[0] == "costs"
    assert compare_stats.verdict([0.0, 0.0001, -0.0001])[0] == "no measurable cost"


def _gates(rows):
    return compare_report.gates(compare_report.summarize(rows, 1))


def test_gate_a_seed_spread_and_grid_edges():
    ok = _report_rows("full_rank", FULL) + _report_rows("galore", [a + 0.01 for a in FULL])
    (name_a, pass_a, notes_a), (_, pass_b, _) = _gates(ok)
    assert pass_a and pass_b and "strictly inside" in notes_a[-1]
    # full-rank's seeds spread by more than 0.02 nats (std): fails
    wide = _report_rows("full_rank", [4.0, 4.05, 3.95, 4.02, 3.98]) + _report_rows("galore", [4.1] * 5)
    (_, pass_a, notes_a), _ = _gates(wide)
    assert not pass_a and "**exceeds** 0.02" in notes_a[0]
    # a best lr at the edge of its grid fails
    edge = _report_rows("full_rank", FULL)
    for r in edge:
        if r["phase"] == "tune":
            r["val_loss"] = 4.0 - math.log2(r["lr"] / 0.01) * 0.05        # the highest lr is the best
    for r in edge:
        if r["phase"] == "report":
            r["lr"] = 0.02
    (_, pass_a, notes_a), _ = _gates(edge)
    assert not pass_a and "lr 0.02 is the highest tried" in notes_a[-1]
    # a control seed that did not finish fails the gate, as does a method whose every tuning lr failed
    lost = _report_rows("full_rank", FULL) + [r for r in _report_rows("x", FULL) if r["phase"] == "tune"]
    lost[0]["status"] = "diverged"
    (_, pass_a, notes_a), _ = _gates(lost)
    assert not pass_a and "x: best point **not strictly inside** its grid (no lr finished at the tuning seeds)" in notes_a
    assert notes_a[-1] == "full_rank: seed(s) 0 did not finish"
    # no sweep: nothing shows the lr is tuned
    flat = [r for r in _report_rows("full_rank", FULL) if r["phase"] == "report"]
    (_, pass_a, notes_a), _ = _gates(flat)
    assert not pass_a and "not swept" in notes_a[-1]


def test_gate_b_galore_may_not_beat_full_rank_by_more_than_2_percent():
    (_, _, _), (_, pass_b, (note,)) = _gates(_report_rows("full_rank", FULL)
                                             + _report_rows("galore", [a - 0.03 for a in FULL]))
    assert not pass_b and "**beats**" in note
    (_, _, _), (_, pass_b, (note,)) = _gates(_report_rows("full_rank", FULL)
                                             + _report_rows("galore", [a - 0.015 for a in FULL]))
    assert pass_b and "0.985×" in note
    (_, _, _), (_, pass_b, (note,)) = _gates(_report_rows("full_rank", FULL))
    assert pass_b and note.startswith("not checked")


def test_results_md_says_a_failed_gate_first_and_draws_no_verdict(tmp_path):
    from training.config import load_config

    facts = {"config": str(REPO / "configs/llama_tiny.json"), "preset": "cpu", "tokens": 614_400, "steps": 300,
             "tokens_per_step": 2048, "eval_every": 100, "seeds": list(range(5)), "tune_seeds": [1000],
             "scales": [], "lr_sweep": True, "galore_rank": 32, "galore_gap": 6, "command": "scripts/compare_galore.sh",
             "base": load_config(str(REPO / "configs/llama_tiny.json")), "references": {},
             "train_tokens": 307_200, "unigram_loss": 4.9}
    rows = (_report_rows("full_rank", FULL, heldout=[a + 0.1 for a in FULL])
            + _report_rows("galore", [a - 0.03 for a in FULL], heldout=[a + 0.07 for a in FULL])
            + _report_rows("m", [a + 0.03 for a in FULL], heldout=[a + 0.13 for a in FULL]))
    rows[0]["params"] = 1000
    compare_report.write_markdown(rows, compare_report.summarize(rows, 1), facts, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    first = md.split("\n")[2]
    assert first.startswith("**A gate FAILED: no verdict is drawn.**")
    assert "costs 1" not in md and "withheld: 1.030×" in md
    assert "- parameters: 1,000" in md and "614.40 tokens per parameter" in md and "passes over the training data: 2.00" in md
    assert "full_rank: 0: step 200, 1: step 200" in md       # the first evaluation <= 4.9 - 0.25: loss 4.5 at step 200
    assert "| full_rank | 4.0000 [4.1000] | 4.0100 [4.1100]" in md
    # both gates pass: verdicts, on the report slice and on c4-heldout
    rows = [r for r in rows if r["method"] != "galore"]
    compare_report.write_markdown(rows, compare_report.summarize(rows, 1), facts, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert md.split("\n")[2].startswith("**Gates passed**") and md.count("costs 1.030×") == 2


def test_crossing_counts_only_pairs_beyond_the_seed_spread():

    def rows(method, curve_losses, finals):
        return [{"method": method, "label": method, "lr": 0.01, "scale": None, "seed": s, "phase": "report",
                 "status": "ok", "val_loss": f, "val_ppl": math.exp(f), "val_galore_ppl": 1.0, "step_time_s": 1.0,
                 "tokens_per_s": 1.0, "curve": list(zip((100, 200, 300), curve_losses))} for s, f in enumerate(finals)]
    summary = compare_report.summarize(rows("full_rank", [5.0, 4.5, 4.0], [4.0, 4.01, 4.02])
                                       + rows("x", [4.9, 4.6, 4.2], [4.2, 4.21, 4.22]), 0)
    assert "after 200 tokens (67% of the budget)" in compare_report.crossing(summary)
    tied = compare_report.summarize(rows("full_rank", [5.0, 4.5, 4.0], [4.0, 4.01, 4.02])
                                    + rows("y", [4.8, 4.65, 4.0], [4.05, 3.95, 4.03]), 0)
    assert compare_report.crossing(tied).startswith("the order of the mean validation losses is the same at all 3 "
                                                    "evaluations (not counted, tied within the seed spread: full_rank/y)")


@pytest.mark.parametrize("preset", ["quick", "cpu"])
def test_every_method_is_a_valid_run_config(preset):
    """Each method's overrides, on top of the preset's, load as a validated run config (a typo in a key or a
    value fails here, not an hour into a comparison)."""
    from training.config import load_config

    args = compare_galore.parse_args(["--preset", preset, "--methods", ",".join(COMPARED)])
    plan = sweep.Plan(args)
    for method in plan.methods:
        run = plan.run(method, plan.centre_lr(method), 0)
        cfg = load_config(plan.config, run["sets"])
        assert cfg.optim.lr == plan.centre_lr(method)
        if plan.lr_sweep:                  # a reported run is scored on the slice after the tuning slice
            assert cfg.data.val_skip_tokens == cfg.data.val_tokens
        if sweep.inherits_scale(method):
            scaled = load_config(plan.config, plan.run(method, 0.001, 1000, 0.5)["sets"])
            assert (scaled.optim.matrix_lr_scale, scaled.data.val_skip_tokens) == (0.5, 0)


def test_sr2_hybrid_method_is_the_velora_setting_of_that_name():
    """One thing, one name: the comparison's hybrid runs exactly `velora.setting=sr2_hybrid`."""
    from training.config import load_config

    velora = load_config("configs/llama_tiny.json", METHODS["sr2_hybrid"].sets).velora
    assert velora.setting == "sr2_hybrid"
    assert {p: velora.codec_for(p) for p in velora.target_list} == {
        "q_proj": "sr2", "k_proj": "sr2", "v_proj": "sr2", "gate_proj": "sr2", "up_proj": "sr2", "down_proj": "velora"}
