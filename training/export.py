"""Export a trained model as a plain LLaMA that `transformers` loads: safetensors + HF config + tokenizer.

`final/` holds `model.safetensors` (plain LLaMA names, VeLoRA buffers left out: VeLoRA changes what
backward stores, never the function, so the exported model is an ordinary LLaMA), `config.json`
(a transformers LlamaConfig dict), `tokenizer.model` and `run_config.json` (the resolved run config,
so `training.load.load_model` can rebuild the model exactly).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from model import LlamaConfig, LlamaForCausalLM
from training.errors import CheckpointError
from training.layout import HF_CONFIG, RUN_CONFIG, TOKENIZER, WEIGHTS
from velora import strip_state_dict


def expected_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a plain LlamaForCausalLM of this config saves."""
    with torch.device("meta"):
        return {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}


def plain_state_dict(state_dict: Mapping[str, torch.Tensor], config: LlamaConfig, where: str) -> dict:
    """The tensors of a plain LlamaForCausalLM taken from `state_dict`, VeLoRA buffers dropped.

    Missing names, other unexpected names and wrong shapes raise a one-line CheckpointError that
    names `where` (the file or directory the tensors came from).
    """
    shapes = expected_shapes(config)
    state_dict = strip_state_dict(state_dict)
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(s)}" for k, s in shapes.items()
             if k in state_dict and state_dict[k].shape != s]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) (e.g. {wrong[0]})")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the model config "
                              f"({'; '.join(problems)}); check that the config belongs to these weights")
    return {k: state_dict[k] for k in shapes}


def _gathered_state_dict(model: torch.nn.Module) -> dict:
    """The module's full state dict, gathering ZeRO-3-partitioned parameters (a collective call)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_final(model, run_config, tokenizer_path, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Write `out_dir` (normally `<output_dir>/final`) atomically: a temporary directory renamed
    into place, so a crash never leaves a half-written export.

    `model` is the plain module (`engine.module` for a DeepSpeed engine) or a state dict (e.g. the
    fp32 weights consolidated from a checkpoint). Under torch.distributed call it on every rank:
    ZeRO-3 parameters are gathered collectively, and only rank 0 writes. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    sd = model if isinstance(model, Mapping) else _gathered_state_dict(model)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return out_dir
    tensors = plain_state_dict(sd, run_config.model, "model being exported")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}

    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    hf = {**run_config.model.to_hf_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
    run_config.save(tmp / RUN_CONFIG)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir
