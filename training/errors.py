"""Errors shared across training/: each carries a one-line message meant to be shown as is."""


class CheckpointError(ValueError):
    """A checkpoint or exported model that cannot be read: the message names the file and the fix."""
