#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project's pins: torch first, so nothing else can pull a
# multi-GB CUDA build on a CPU machine; on a CUDA machine the same pin resolves to the CUDA wheel.
# Usage: scripts/setup.sh [requirements file]   (default requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.installed-$(cat "$req" requirements.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -r "$req"
  # DeepSpeed JIT-compiles its CPU communication op at its first start: do it here, once, so that no
  # training run compiles it (a run killed mid-build would leave a lock that blocks every later run).
  .venv/bin/python -c "from training.distributed import build_comm_op; build_comm_op()" > /dev/null
  touch "$stamp"
fi
