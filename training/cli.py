"""What the command-line scripts share: bad input ends in one line and exit code 2, not a traceback."""
from __future__ import annotations

import sys

from data import DataError
from training.config import ConfigError
from training.errors import CheckpointError

# Errors whose message is written for the user. --debug shows the traceback instead.
USER_ERRORS = (CheckpointError, ConfigError, DataError, OSError)


def run(main, prog: str, argv: list[str] | None = None) -> int:
    """Call `main(argv)`; a user error prints `prog: error: message` on stderr and returns 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
