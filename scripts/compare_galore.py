"""The comparison's driver (training/commands/compare.py); run it through scripts/compare_galore.sh.
Options: --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.commands.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
