"""scripts/bench_velora.py cost: the kernel and byte counts it reports, at a toy size (compiles two graphs)."""
import subprocess
import sys

import pytest

from conftest import REPO, env


@pytest.mark.slow
def test_cost_counts_kernels_and_the_fused_sr2_stays_within_6_bytes_per_element():
    p = subprocess.run([sys.executable, "scripts/bench_velora.py", "cost", "--tokens", "64", "--hidden", "256"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in p.stdout.splitlines()[2:]}
    assert rows["nn.Linear"][:2] == ["3", "8"]                        # three mm forward; backward's mm and adds
    eager, fused = rows["sr2 eager"], rows["sr2 fused"]
    assert int(fused[0]) + int(fused[1]) < int(eager[0]) + int(eager[1])
    assert 0 < float(fused[6]) <= 6.0                                 # issue 20's goal for sr2 in bf16
