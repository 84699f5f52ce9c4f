"""scripts/bench_integrity.py runs end to end on the tiny config and prints its table."""
import subprocess
import sys

from conftest import REPO, env


def test_bench_integrity_prints_every_row(tmp_path):
    p = subprocess.run([sys.executable, "scripts/bench_integrity.py", "--config", "configs/llama_tiny.json",
                        "--repeats", "1"], cwd=REPO, env={**env(), "BENCH_DIR": str(tmp_path)}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "median" not in line]
    assert len(rows) == 6 and rows[1].startswith("| write_manifest (CRC-32") and list(tmp_path.iterdir()) == []
