"""Our trainer against the official GaLore / VeLoRA codes, update by update (training/commands/parity.py).
Options: --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.commands.parity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
