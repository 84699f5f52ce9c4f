#!/usr/bin/env bash
# The README's main command: set up .venv, then train llama_tiny on the built-in corpus on this
# machine (CPU or one GPU) and print the validation perplexity. Extra arguments go to train_c4.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train_c4.py --config configs/llama_tiny.json "$@"
