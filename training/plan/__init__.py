"""The memory planner: the peak memory of one training step and its parts, from a fake-tensor run on CPU
(`plan.plan_memory`). Its bytes follow the house's one count rule (common/tensor_bytes.py)."""

DTYPES = ("bf16", "fp32")       # the compute dtypes a plan is made for (--dtype)
