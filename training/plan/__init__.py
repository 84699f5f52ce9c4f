"""The memory planner: the peak memory of one training step and its parts, from a fake-tensor run on CPU
(`plan_memory`), and the exact tensor accounting it shares with the benchmarks (`state_bytes`)."""
from .tensors import state_bytes

__all__ = ["state_bytes"]
