"""Reading DeepSpeed's pickled checkpoint files without running code: the allow-list of the globals its
files hold (mapped to inert stand-ins), and the checks that refuse a truncated or foreign file before
DeepSpeed, which unpickles fully, reads it."""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from common.errors import CheckpointError


def broken_archives(tag_dir: Path) -> list[str]:
    """The `.pt` files of a checkpoint that are not complete zip archives (torch.save writes zips; a
    truncated one has lost its central directory at the end)."""
    return [f.name for f in sorted(Path(tag_dir).glob("*.pt")) if not zipfile.is_zipfile(f)]


class OpaqueState:
    """What an allowed non-tensor object of a checkpoint unpickles to when only checking or reading
    weights: an inert stand-in (nothing of DeepSpeed or galore_torch is imported or run)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Every global DeepSpeed 0.19's own checkpoints hold besides tensors and containers (read off real
# checkpoints of ZeRO 0-3, fp32 and bf16, AdamW, Adafactor and GaLore; every resume test checks them, and
# tests/test_train_c4.py::test_two_processes_match_one_process checks ZeRO 1-3 directly).
ALLOWED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address",
                   "galore_torch.galore_projector.GaLoreProjector")


def safe_load(file: Path):
    """torch.load(weights_only=True) with the allow-list mapped to inert stand-ins: loading runs no code."""
    with torch.serialization.safe_globals([(OpaqueState, name) for name in ALLOWED_GLOBALS]):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def check_pickles(tag_dir: Path) -> None:
    """Before DeepSpeed (which unpickles fully) reads a checkpoint: every `.pt` file of `tag_dir` must load
    with `safe_load`, else a one-line CheckpointError names the file and the global it would run."""
    for f in sorted(Path(tag_dir).glob("*.pt")):
        try:
            safe_load(f)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"the global {found.group(1)}" if found else "an object"
            raise CheckpointError(f"{f}: holds {what}, which is not in the allow-list of what DeepSpeed's "
                                  f"checkpoints contain; loading it could run code, so it is refused (pass "
                                  f"--trust-checkpoint only for a checkpoint whose origin you trust)") from None
        except Exception as e:
            raise CheckpointError(f"{f}: cannot be read as a torch checkpoint ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0]}); use another checkpoint") from None
