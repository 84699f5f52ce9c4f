"""What every floor of the house may import: the user-facing error types (`common.errors`). A leaf: it
imports nothing of ours, so `model/`, `velora/` and `data/` use it without depending on `training/`."""
