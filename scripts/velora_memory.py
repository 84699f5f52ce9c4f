"""Bytes saved for backward by a run config's model (training/commands/memory.py; installed as `velora-memory`). Options: --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.commands.memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
