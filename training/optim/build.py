"""Optimizers for `optim.name` (the checks that must pass first are RunConfig.validate's).

- `adamw`: torch.optim.AdamW, or DeepSpeed's own when the `deepspeed` section has an "optimizer" key.
- `adamw8bit`: bitsandbytes' AdamW8bit: both moments in 8 bits, block-wise quantized (blocks of 256 with
  an fp32 scale each); tensors under 4096 elements keep fp32 moments. It runs on CPU and CUDA with the same
  state layout (torchao's AdamW8bit compiles each parameter shape on CPU: docs/BENCHMARKS.md, "The memory planner").
- `adafactor`: torch.optim.Adafactor at ZeRO 0. Under ZeRO 1-3, where DeepSpeed hands the optimizer flat
  tensors, training/optim/zero_adafactor.py's ZeroAdafactor: the same maths with its second moment still
  factored (row and column statistics all-reduced across the ranks holding a matrix).
- `galore_adamw` / `galore_adafactor`: galore-torch with GaLore's two parameter groups: the 2-D
  weights of modules whose name contains one of `optim.galore_targets` ("attn", "mlp") get the
  low-rank projection, every other parameter is optimized as usual. Under ZeRO 1-3 the galore-torch
  optimizer is wrapped in training/optim/zero_galore.py's ZeroGaLore (each matrix stepped whole by one owner).

The ZeRO optimizers learn their partition layout (training/optim/zero_layout.py) from `bind_zero`, which
build_engine calls after deepspeed.initialize; under ZeRO >= 1 we set `zero_allow_untested_optimizer`.
"""
from __future__ import annotations

import copy

import torch

from ..config import RunConfig
from common.errors import ConfigError
from .zero_adafactor import ZeroAdafactor
from .zero_galore import ZeroGaLore


def galore_param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """GaLore's groups: [plain parameters, projected 2-D weights of target modules]."""
    projected = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, torch.nn.Parameter) and weight.dim() == 2
                and any(t in module_name for t in optim_cfg.galore_targets)):
            projected[id(weight)] = weight
    if not projected:
        raise ConfigError(f"optim.galore_targets={optim_cfg.galore_targets}: no module name contains any of them; "
                          f"use names such as 'attn' and 'mlp'")
    plain = [p for p in model.parameters() if id(p) not in projected]
    return [{"params": plain},
            {"params": list(projected.values()), "rank": optim_cfg.galore_rank,
             "update_proj_gap": optim_cfg.galore_update_proj_gap, "scale": optim_cfg.galore_scale,
             "proj_type": optim_cfg.galore_proj_type}]


def lr_split_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """GaLore's two groups without the projection: the matrices at `matrix_lr_scale` x lr, the rest at lr."""
    plain, matrices = galore_param_groups(model, optim_cfg)
    return [plain, {"params": matrices["params"], "lr": optim_cfg.lr * optim_cfg.matrix_lr_scale}]


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> tuple[torch.optim.Optimizer | None, dict, list[str]]:
    """Return (client optimizer or None when DeepSpeed builds its own, the deepspeed dict to pass to
    deepspeed.initialize, notes to print). The returned dict is a copy; `cfg` is not modified."""
    o, ds, notes = cfg.optim, copy.deepcopy(cfg.deepspeed), []
    if "optimizer" in ds:
        notes.append(f"optimizer: DeepSpeed's {ds['optimizer'].get('type')} (from deepspeed.optimizer); "
                     f"optim.lr and betas are not used")
        return None, ds, notes
    params = model.parameters()
    if o.matrix_lr_scale != 1.0:
        params = lr_split_groups(model, o)
        notes.append(f"optimizer: attention and MLP matrices at {o.matrix_lr_scale:g} x lr (optim.matrix_lr_scale)")
    if o.name == "adamw":
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay)
    elif o.name == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    elif o.name == "adafactor":
        factored = ZeroAdafactor if cfg.zero_stage >= 1 else torch.optim.Adafactor
        opt = factored(params, lr=o.lr, weight_decay=o.weight_decay)
        if cfg.zero_stage >= 1:
            notes.append(f"optimizer: adafactor, second moments factored across the ZeRO {cfg.zero_stage} partitions")
    else:
        from galore_torch import GaLoreAdafactor, GaLoreAdamW

        groups = galore_param_groups(model, o)
        if o.name == "galore_adamw":
            opt = GaLoreAdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                              no_deprecation_warning=True)
        else:
            opt = GaLoreAdafactor(groups, lr=o.lr, weight_decay=o.weight_decay, relative_step=False,
                                  scale_parameter=False, warmup_init=False)
        n = sum(p.numel() for p in groups[1]["params"])
        if cfg.zero_stage >= 1:
            opt = ZeroGaLore(opt)
        notes.append(f"optimizer: {o.name}, rank {o.galore_rank}, update_proj_gap {o.galore_update_proj_gap}, "
                     f"scale {o.galore_scale}, {len(groups[1]['params'])} projected matrices ({n / 1e6:.2f}M params)")
    if cfg.zero_stage >= 1 and o.name != "adamw":
        ds["zero_allow_untested_optimizer"] = True
    return opt, ds, notes
