"""What every floor of the house may import: the user-facing error types and the one validation style
(`common.errors`), the one byte-count rule (`common.tensor_bytes`), and the project's version. A leaf: it
imports nothing of ours, so `model/`, `velora/` and `data/` use it without depending on `training/`."""

__version__ = "0.2.0"     # the project's version (pyproject.toml reads it from here)
