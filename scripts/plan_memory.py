"""Will it fit? The peak memory of one training step per method, from a fake-tensor run on CPU
(training/commands/plan.py; installed as `velora-plan`). Options: --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.commands.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
