"""Every error meant for the user, in one place. Each carries a one-line message that names the culprit
and the fix; `training.cli.run` prints it and exits with code 2 (a traceback only with --debug).

A leaf module (it imports nothing of ours), so every floor (`model/`, `velora/`, `data/`, `training/`)
raises these without depending on a higher one.
"""
from __future__ import annotations


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
        raise error(f"{key}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
