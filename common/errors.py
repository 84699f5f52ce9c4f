"""Every error meant for the user, in one place. Each carries a one-line message that names the culprit
and the fix; `training.cli.run` prints it and exits with code 2 (a traceback only with --debug).

A leaf module (it imports nothing of ours), so every floor (`model/`, `velora/`, `data/`, `training/`)
raises these without depending on a higher one.
"""
from __future__ import annotations

import math


class UserError(Exception):
    """Bad input or a state the user must fix: the message is shown as is, without a traceback."""


class ConfigError(UserError, ValueError):
    """A bad run config or override."""


class DataError(UserError, ValueError):
    """Bad data input or settings."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or exported model that cannot be read or resumed."""


class RunError(UserError, RuntimeError):
    """A run that cannot start or continue (unwritable output, output in use, diverged loss)."""


class NonFiniteLoss(RunError):
    """The loss became inf/nan; raised before the optimizer step that would apply it."""


def check_choice(key: str, value, allowed, error: type[UserError] = ConfigError) -> None:
    """Raise `error` unless `value` is one of `allowed`."""
    if value not in allowed:
        shown = (str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)   # JSON's true / false
        raise error(f"{key}: expected one of {', '.join(shown)}, got {value!r}")


def is_number(value, integer: bool = False) -> bool:
    """A finite int or float (only an int when `integer`; a bool is not a number here)."""
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(key: str, value, error: type[UserError] = ConfigError, integer: bool = False) -> None:
    """Raise `error` unless `value` is a finite number > 0 (an int when `integer`)."""
    if not (is_number(value, integer) and value > 0):
        raise error(f"{key}: must be {'a positive int' if integer else 'positive'}, got {value!r}")


def check_range(key: str, value, lo: float, hi: float = math.inf, what: str = "",
                error: type[UserError] = ConfigError, integer: bool = False) -> None:
    """Raise `error` unless `value` is a finite number (an int when `integer`) with lo <= value < hi; `what`
    says the range in the message (default `>= lo`)."""
    if not (is_number(value, integer) and lo <= value < hi):
        raise error(f"{key}: must be {what or f'>= {lo}'}, got {value!r}")
