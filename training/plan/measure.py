"""Memory measured on real CPU tensors, the planner's independent checks: bytes saved for backward by
category (velora.memory) for a run config's model, and the exact bytes of one comparison method's parameters,
gradients and optimizer state. Counts follow the one byte-count rule (common/tensor_bytes.py)."""
from __future__ import annotations

import torch

from common.tensor_bytes import state_bytes
from model import LlamaForCausalLM
from velora import apply_velora
from velora.memory import measure_step

from ..config import load_config, resolve_batch


def build_and_measure(model_cfg, velora_cfg, batch_size: int, seq_len: int, dtype: str = "fp32",
                      seed: int = 0) -> dict:
    """Build our LLaMA from `model_cfg` (model.LlamaConfig), apply VeLoRA, measure one step."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_cfg)
    model, summary = apply_velora(model, velora_cfg)
    ids = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len))
    report = measure_step(model, ids, torch.bfloat16 if dtype == "bf16" else None)
    report["velora_warnings"] = summary.warnings
    return report


def format_report(report: dict) -> str:
    """A readable table of `measure_step`'s result."""
    mib, tok = 2 ** 20, report["tokens"]
    lines = [f"{'saved for backward':<22}{'MiB':>10}{'B/token':>10}"]
    for cat, b in report["saved"].items():
        lines.append(f"  {cat:<20}{b / mib:>10.2f}{b / tok:>10.0f}")
    lines.append(f"  {'total':<20}{report['saved_total'] / mib:>10.2f}{report['saved_total'] / tok:>10.0f}")
    for key in ("parameters", "gradients", "optimizer_states"):
        lines.append(f"{key.replace('_', ' '):<22}{report[key] / mib:>10.2f}")
    lines += [f"warning: {w}" for w in report.get("velora_warnings", [])]
    return "\n".join(lines)



def measure_run(run: dict, measure_batch: int) -> dict:
    """Exact tensor bytes for one comparison run's method (`run`: its config path and overrides): saved for backward per micro-batch (velora.memory, measured
    at `measure_batch` sequences and scaled), parameters, gradients, optimizer state after one step."""
    from ..build import build_model, seed_everything
    from ..optim import build_optimizer

    # One process without DeepSpeed: the ZeRO 1/2 optimizers need an engine's partition layout.
    cfg = load_config(run["config"], run["sets"] + ["deepspeed.zero_optimization.stage=0"])
    micro = resolve_batch(cfg.deepspeed, 1)[1]
    b = min(micro, measure_batch)
    seed_everything(cfg.train.seed)
    model, _ = build_model(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (b, cfg.data.seq_len))
    bf16 = cfg.bf16
    rep = measure_step(model, ids, torch.bfloat16 if bf16 else None)
    optimizer, _, _ = build_optimizer(model, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids)
    loss.backward()
    optimizer.step()
    return {"params": sum(p.numel() for p in model.parameters()),
            "param_bytes": rep["parameters"], "grad_bytes": rep["gradients"],
            "optim_state_bytes": state_bytes(optimizer.state),
            "saved_bytes_micro": rep["saved_total"] * micro / b, "saved_measured_batch": b, "micro_batch": micro,
            "saved_by_category_micro": {k: v * micro / b for k, v in rep["saved"].items()}}
