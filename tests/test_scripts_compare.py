"""scripts/compare_galore.sh: every method end to end on a very small budget, a failing method reported
in its row, completed runs reused on a second call."""
import csv
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import compare_galore  # noqa: E402

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
    assert set(rows) == set(compare_galore.METHODS)
    bad = rows.pop("galore")
    assert bad["status"] == "failed" and "optim.name" in bad["error"] and "sgd" in bad["error"]
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["error"])
        for key in ("val_loss", "val_ppl", "val_galore_ppl", "saved_bytes_micro", "optim_state_bytes", "param_bytes",
                    "tokens_per_s", "step_time_vs_full_rank", "peak_rss", "wall_s"):
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
