"""What a run is made of: seeded initial weights, the model with VeLoRA applied, and the DeepSpeed engine."""
from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import numpy as np
import torch

from model import LlamaForCausalLM

from .config import RunConfig
from .optim import build_optimizer, build_scheduler, partition_layouts


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights everywhere (DeepSpeed also broadcasts them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_initial_weights(model: LlamaForCausalLM, path: str) -> None:
    """Overwrite `model`'s weights with those in `path` (`train.init_from`): a safetensors file with plain
    LLaMA names, or a directory holding model.safetensors. A one-line CheckpointError when it is missing or
    does not fit the model."""
    from common.errors import CheckpointError
    from .hf import plain_state_dict, read_safetensors
    from .state import WEIGHTS

    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"train.init_from: {file} does not exist; point it at a .safetensors file or an "
                              f"exported final/ directory")
    try:
        state = plain_state_dict(read_safetensors(file), model.config, str(file))
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    model.load_state_dict(state)


def build_model(cfg: RunConfig):
    """The LLaMA model (from `train.init_from` when set) with VeLoRA applied when enabled; returns
    (model, VeLoRA summary or None)."""
    model = LlamaForCausalLM(cfg.model)
    if cfg.train.init_from:
        load_initial_weights(model, cfg.train.init_from)
    if not cfg.velora.enabled:
        return model, None
    from velora import apply_velora

    return apply_velora(model, cfg.velora)


def build_engine(model: torch.nn.Module, cfg: RunConfig):
    """deepspeed.initialize with our optimizer (or DeepSpeed's) and LR schedule; returns (engine, notes)."""
    import deepspeed

    optimizer, ds, notes = build_optimizer(model, cfg)
    scheduler = partial(build_scheduler, optim_cfg=cfg.optim, max_steps=cfg.train.max_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds,
                                      model_parameters=model.parameters() if optimizer is None else None)
    if hasattr(optimizer, "bind_zero"):
        optimizer.bind_zero(partition_layouts(engine))
    return engine, notes
