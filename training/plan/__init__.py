"""The memory planner: the peak memory of one training step and its parts, from a fake-tensor run on CPU
(`plan_memory`), and the exact tensor accounting it shares with the benchmarks (`state_bytes`)."""
from .tensors import state_bytes

__all__ = ["plan_memory", "state_bytes"]


def __getattr__(name: str):
    # plan_memory pulls in the training stack: loaded on first use, so `--help` and state_bytes stay light
    if name == "plan_memory":
        from .plan import plan_memory
        return plan_memory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
