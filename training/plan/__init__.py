"""The memory planner: the peak memory of one training step and its parts, from a fake-tensor run on CPU
(`plan_memory`), its reports (`plan_config`, `parts_table`, `fit_markdown`), and the real-tensor measurements
it is checked against (`build_and_measure`, `format_report`, `measure_run`).
Its bytes follow the house's one count rule (common/tensor_bytes.py)."""

DTYPES = ("bf16", "fp32")       # the compute dtypes a plan is made for (--dtype)
# name -> module: most pull in the training stack, so they load on first use and `--help` stays light
_LAZY = {"plan_memory": "plan", "plan_with_traces": "plan", "fit_table": "fit", "plan_config": "report",
         "parts_table": "report", "fit_markdown": "report", "build_and_measure": "measure",
         "format_report": "measure", "measure_run": "measure"}
__all__ = ["DTYPES", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
