#!/usr/bin/env bash
# VeLoRA vs GaLore vs full-rank (scripts/compare_galore.py): every method as a full train_c4.py run,
# then OUT/results.csv, results.md and plot.png. Arguments go to the driver (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
PYTHONUNBUFFERED=1 exec "$PY" scripts/compare_galore.py "$@"
