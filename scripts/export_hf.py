"""Export a checkpoint as a plain Hugging Face LLaMA (training/commands/export.py; installed as `velora-export`). Options: --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.commands.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
