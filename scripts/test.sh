#!/usr/bin/env bash
# The README's test command: set up .venv with the test extras, then run every test that does not
# need a GPU (slow and two-process tests included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -m "not gpu" "$@"
