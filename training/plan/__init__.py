"""The memory planner: the peak memory of one training step and its parts, from a fake-tensor run on CPU
(`plan_memory`), and the real-tensor measurements it is checked against (`build_and_measure`, `format_report`).
Its bytes follow the house's one count rule (common/tensor_bytes.py)."""

DTYPES = ("bf16", "fp32")       # the compute dtypes a plan is made for (--dtype)
__all__ = ["DTYPES", "build_and_measure", "fit_markdown", "fit_table", "format_report", "measure_run", "parts_table",
           "plan_config", "plan_memory", "plan_with_traces"]


def __getattr__(name: str):
    # most pull in the training stack: loaded on first use, so `--help` stays light
    if name in ("plan_memory", "plan_with_traces"):
        from . import plan
        return getattr(plan, name)
    if name in ("fit_markdown", "parts_table", "plan_config"):
        from . import report
        return getattr(report, name)
    if name == "fit_table":
        from .fit import fit_table
        return fit_table
    if name in ("build_and_measure", "format_report", "measure_run"):
        from . import measure
        return getattr(measure, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
