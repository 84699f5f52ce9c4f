"""The one error path of every command-line entry point: a user error ends in one line and exit code 2."""
from __future__ import annotations

import sys
from pathlib import Path

from common.errors import UserError

# Errors whose message is written for the user (OSError: a file the user named cannot be read or
# written). --debug shows the traceback instead.
USER_ERRORS = (UserError, OSError)


def prog() -> str:
    """The name the user typed: `eval_ppl.py` for `python scripts/eval_ppl.py`, `velora-eval` for the console script."""
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "velora"


def run(main, prog: str | None, argv: list[str] | None = None) -> int:
    """Call `main(argv)`; a user error prints `prog: error: message` (`error: message` without a prog)
    on stderr and returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"{prog + ': ' if prog else ''}error: {e}", file=sys.stderr)
        return 2
