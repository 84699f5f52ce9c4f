"""Perplexity of a checkpoint (training/commands/eval.py; installed as `velora-eval`). Options: --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.commands.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
