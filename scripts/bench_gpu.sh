#!/usr/bin/env bash
# scripts/bench_gpu.py on the lent GPU machine (docs/BENCHMARKS.md, "H200"): installs a carried
# galore-torch wheel from .whl/ when there is one, then passes its arguments on.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/galore_torch-*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/galore_torch-*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONUNBUFFERED=1 exec python3 scripts/bench_gpu.py "$@"
