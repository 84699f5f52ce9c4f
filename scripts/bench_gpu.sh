#!/usr/bin/env bash
# The GPU check on the lent machine (docs/BENCHMARKS.md, "The GPU check"): installs the carried wheelhouse
# (.whl/, made beforehand by scripts/gpu_wheelhouse.py, carried with `carry: [".whl"]`) offline and
# without touching torch (pinned to the installed version), then runs scripts/bench_gpu.py with the
# arguments given. Without .whl/ it runs on what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .whl/requirements.txt ]; then
  pin="$(mktemp)"
  python3 -c 'import torch; print(f"torch=={torch.__version__}")' > "$pin"
  export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_FIND_LINKS=.whl
  install() { python3 -m pip install -q -c "$pin" "$@" || python3 -m pip install -q --user -c "$pin" "$@"; }
  install -r .whl/requirements.txt
  install --no-deps -r .whl/requirements-nodeps.txt
  echo "installed the wheelhouse: $(python3 -c 'import deepspeed, torch; print("deepspeed", deepspeed.__version__, "torch", torch.__version__)')"
fi
PYTHONUNBUFFERED=1 exec python3 scripts/bench_gpu.py "$@"
