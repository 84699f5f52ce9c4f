"""The planner's reports: every plan of one config (and the largest micro-batch per GPU size), as a JSON
object, an aligned text table, or one Markdown table over several configs."""
from __future__ import annotations

from pathlib import Path

from ..methods import METHODS


def parts_table(plans: list) -> str:
    """The plans as an aligned text table: peak, GPU and host bytes and every part, in MiB."""
    keys = sorted({k for p in plans for k in p["parts"]}, key=lambda k: list(plans[0]["parts"]).index(k)
                  if k in plans[0]["parts"] else 99)
    head = ["method", "ZeRO", "batch", "peak MiB", "GPU alloc MiB", "host MiB"] + [k.replace("_", " ") for k in keys]
    rows = [[p["method"], str(p["zero_stage"]), str(p["micro_batch"]), f"{p['peak_bytes'] / 2**20:.1f}",
             f"{p['cuda']['max_memory_allocated'] / 2**20:.1f}", f"{p['host_bytes'] / 2**20:.1f}"]
            + [f"{p['parts'].get(k, 0) / 2**20:.1f}" for k in keys] for p in plans]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def plan_config(path: str, methods: list, stages: list | None = None, batches: list | None = None,
                world_size: int = 1, dtype: str | None = None, gpu_gbs: list | None = None) -> tuple[dict, list]:
    """Every requested plan (and, with `gpu_gbs`, the largest micro-batch per GPU size) for one config: (the JSON
    object, the plans in table order). ZeRO stages, micro-batches and dtype default to the config's."""
    from ..config import load_config
    from .fit import fit_table
    from .plan import plan_with_traces

    cfg = load_config(path)
    stages = stages or [cfg.zero_stage]
    batches = batches or [cfg.deepspeed.get("train_micro_batch_size_per_gpu", 1)]
    dtype = dtype or ("bf16" if cfg.bf16 else "fp32")
    out = {"config": path, "dtype": dtype, "world_size": world_size, "seq_len": cfg.data.seq_len,
           "predicted": "fake-tensor step on CPU; cuda.* adds the stated GPU corrections", "methods": {}}
    plans, known = [], {}
    for m in methods:
        for z in stages:
            for b in batches:
                known[m, z, b] = plan_with_traces(cfg, m, b, z, world_size, dtype)
        per = [known[m, z, b][0] for z in stages for b in batches]
        plans += per
        out["methods"][m] = per[0] if len(per) == 1 else per
    if gpu_gbs:
        out["largest_micro_batch"] = {z: fit_table(cfg, methods, gpu_gbs, z, world_size, dtype, known)
                                      for z in stages}
    return out, plans


def fit_markdown(results: list, methods: list) -> str:
    """One row per method, one column per (config, GPU size): the largest micro-batch (first ZeRO stage)."""
    cols = [(out["config"], gb) for out in results for gb in next(iter(out["largest_micro_batch"].values()))[methods[0]]]
    lines = ["| method | " + " | ".join(f"{Path(c).stem.removeprefix('llama_')} {gb:g} GiB" for c, gb in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for m in methods:
        cells = [str(next(iter(out["largest_micro_batch"].values()))[m][gb]) for out in results
                 for gb in next(iter(out["largest_micro_batch"].values()))[m]]
        lines.append(f"| {METHODS[m].label} (`{m}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
