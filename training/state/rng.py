"""The random generators' states a checkpoint saves per rank, so that a resumed run draws what the
uninterrupted one would have drawn."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Python, NumPy, torch CPU and (on a GPU) this rank's CUDA device's generator states as JSON-friendly lists.
    Only the current device's: each rank drives one GPU, and reading every device's state would initialise a
    CUDA context on each GPU of the node from every rank."""
    py = random.getstate()
    npy = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from `rng_state`'s lists (the CUDA one only where this process has a GPU)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
