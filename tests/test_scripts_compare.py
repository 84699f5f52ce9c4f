"""scripts/compare_galore.sh: every method of the quick preset end to end on a very small budget, a failing
method reported in its row, completed runs reused on a second call; the lr sweep's extension at an edge, the
seed statistics and the curve-crossing check on synthetic results."""
import csv
import math
import subprocess

import pytest

from conftest import REPO

import compare_galore

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
    assert set(rows) == set(compare_galore.PRESETS["quick"].methods)
    bad = rows.pop("galore")
    assert bad["status"] == "failed" and "optim.name" in bad["error"] and "sgd" in bad["error"]
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["error"])
        for key in ("val_loss", "val_ppl", "val_galore_ppl", "saved_bytes_micro", "optim_state_bytes", "param_bytes",
                    "tokens_per_s", "step_time_s", "peak_rss", "wall_s"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (name, key, r[key])
        assert r["command"].startswith("python train_c4.py --config configs/llama_tiny.json")
        assert (out / "logs" / f"{name}.log").is_file()
    # exact bytes: activation checkpointing and VeLoRA + memory options save less than full-rank
    assert float(rows["full_rank_ckpt"]["saved_vs_full_rank"]) < 1
    assert float(rows["velora_all_memopts"]["saved_bytes_micro"]) < float(rows["velora_all"]["saved_bytes_micro"])
    # GaLore's low-rank moments are smaller than AdamW's
    assert float(rows["velora_all_galore"]["optim_state_bytes"]) < float(rows["velora_all"]["optim_state_bytes"])

    md = (out / "results.md").read_text()
    assert "FAILED" in md and "34.06" in md and "33.28" in md and "scripts/compare_galore.sh --quick" in md
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


CENTRE = 0.001


def _fake_sweep(monkeypatch, tmp_path, *argv):
    """compare_galore.sweep with fake runs whose loss is a parabola in log2(lr), minimum at 4x the centre."""
    def fake_execute(run, threads, lock):
        return {"cmd": run["cmd"][1:], "returncode": 0, "wall_s": 1.0, "error": None, "diverged": False}

    monkeypatch.setattr(compare_galore, "execute", fake_execute)
    monkeypatch.setattr(compare_galore, "read_log", _fake_log)
    args = compare_galore.parse_args(["--quick", "--methods", "full_rank", "--lr-sweep", "--lr", str(CENTRE),
                                      "--out", str(tmp_path), *argv])
    args.argv = []
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        return compare_galore.sweep(compare_galore.Plan(args), pool, 1)


def _fake_log(run_dir):
    lr = float(run_dir.name.split("_lr")[1].split("_")[0])
    seed = int(run_dir.name.rsplit("_s", 1)[1])
    loss = 4.0 + (math.log2(lr / CENTRE) - 2) ** 2 * 0.01 + 0.001 * seed
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_galore_ppl": math.exp(loss), "step_time_s": 1.0,
            "tokens_per_s": 1.0, "curve": [(100, loss + 1), (200, loss)]}


def test_sweep_on_fewer_seeds_then_the_best_lr_at_every_seed(monkeypatch, tmp_path):
    done = _fake_sweep(monkeypatch, tmp_path, "--seeds", "3", "--sweep-seeds", "1")
    by_lr = {}
    for run, _ in done:
        by_lr.setdefault(run["lr"], set()).add(run["seed"])
    assert by_lr.pop(CENTRE * 4) == {0, 1, 2} and all(seeds == {0} for seeds in by_lr.values())
    import compare_report
    rows = [{"method": r["method"], "label": r["label"], "lr": r["lr"], "seed": r["seed"], "status": "ok",
             **_fake_log(r["run_dir"])} for r, _ in done]
    assert compare_report.summarize(rows, 3)[0]["best_lr"] == CENTRE * 4


def test_lr_sweep_extends_past_an_edge_and_picks_the_best_mean(monkeypatch, tmp_path):
    """The 5-point grid (centre/4 .. centre*4) has its best at the upper edge, so the sweep adds 8x, finds 4x
    interior and stops."""
    centre = CENTRE
    done = _fake_sweep(monkeypatch, tmp_path, "--seeds", "2")
    lrs = sorted({run["lr"] for run, _ in done})
    assert lrs == [centre * 2.0 ** k for k in range(-2, 4)]
    assert len(done) == 2 * len(lrs)
    import compare_report
    rows = [{"method": r["method"], "label": r["label"], "lr": r["lr"], "seed": r["seed"], "status": "ok",
             **_fake_log(r["run_dir"])} for r, _ in done]
    summary = compare_report.summarize(rows, 2)
    assert summary[0]["best_lr"] == centre * 4 and not summary[0]["edge"]


def test_seed_statistics_and_crossing():
    import compare_report
    assert "beyond the seed spread" in compare_report.spread_verdict([1.05, 1.06, 1.04])
    assert compare_report.spread_verdict([1.05, 0.95, 1.01]).startswith("within the seed spread")
    assert compare_report.spread_verdict([1.02]) == "one seed: spread unknown"

    def rows(method, losses):
        return [{"method": method, "label": method, "lr": 0.01, "seed": s, "status": "ok", "val_loss": losses[-1],
                 "val_ppl": math.exp(losses[-1]) * (1 + 0.01 * s), "val_galore_ppl": 1.0, "step_time_s": 1.0,
                 "tokens_per_s": 1.0, "curve": list(zip((100, 200, 300), losses))} for s in range(3)]
    summary = compare_report.summarize(rows("full_rank", [5.0, 4.5, 4.0]) + rows("x", [4.9, 4.6, 4.2]), 3)
    assert summary[1]["ratio"][0] == pytest.approx(math.exp(0.2))
    assert "after 200 tokens (67% of the budget)" in compare_report.crossing(summary)
    # a pair tied within the seed spread may swap without counting; one seed counts every pair
    noisy = rows("y", [4.8, 4.65, 4.0])
    for r, f in zip(noisy, (1.05, 0.95, 1.0)):
        r["val_ppl"] = math.exp(4.0) * f
    tied = compare_report.summarize(rows("full_rank", [5.0, 4.5, 4.0]) + noisy, 3)
    assert compare_report.crossing(tied).startswith("the order of the mean validation losses is the same at all 3 "
                                                    "evaluations (not counted, tied within the seed spread: full_rank/y)")
    one = compare_report.summarize([r for r in rows("full_rank", [5.0, 4.5, 4.0]) + noisy if r["seed"] == 0], 1)
    assert "last changed at the evaluation after 300 tokens" in compare_report.crossing(one)

    # a method with its own lr recipe is paired against full-rank with that recipe, and judged against it
    both = rows("full_rank", [5.0, 4.5, 4.0]) + rows("split", [4.0, 3.5, 3.0]) + rows("codec_split", [4.0, 3.5, 3.005])
    for r in both:
        r["saved_bytes_micro"] = 85 if r["method"] == "codec_split" else 100
    summary = compare_report.summarize(both, 3, {"codec_split": "split"})
    assert summary[2]["ratio"][0] == pytest.approx(math.exp(-0.995))
    assert summary[2]["same_recipe"]["ratio"][0] == pytest.approx(math.exp(0.005))
    assert "same_recipe" not in summary[1]
    goals = compare_report._goals(summary)
    assert goals == [goals[0]] and "ppl ratio to split 1.005" in goals[0] and goals[0].endswith("— met.")



@pytest.mark.parametrize("preset", ["quick", "cpu"])
def test_every_method_is_a_valid_run_config(preset):
    """Each method's overrides, on top of the preset's, load as a validated run config (a typo in a key or a
    value fails here, not an hour into a comparison)."""
    from training.config import load_config

    args = compare_galore.parse_args(["--preset", preset, "--methods", ",".join(compare_galore.METHODS)])
    plan = compare_galore.Plan(args)
    for method in plan.methods:
        run = plan.run(method, plan.centre_lr(method), 0)
        cfg = load_config(plan.config, run["sets"])
        assert cfg.optim.lr == plan.centre_lr(method)
