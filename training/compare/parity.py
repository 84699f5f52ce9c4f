"""Our trainer against the official GaLore / VeLoRA codes, update by update (issue 21).

`../shared/reference/official-galore-20m/` (see its README) holds what the official codes did on their
20M LLaMA setup: the seed-0 initial weights, the document order of every batch, and every update's
training loss of three runs (full-rank AdamW, GaLore AdamW, VeLoRA `vd`) with their validation losses.
This runs our trainer's own pieces on the same setup: the run config through `load_config`, the model
through `build_model` (`train.init_from` loads the reference's weights; VeLoRA applied as a run applies
it), the optimizer, LR schedule and DeepSpeed engine (ZeRO 0, fp32, one process) through `build_engine`,
the batches through `TrainBatches` (`data.doc_order` replays the reference's documents, tokenized and
packed by data/), and every update through the loop's `OptimizerStep`. It prints, per update, our
training loss (the loss of batch k before update k, what the official loop logs) beside the reference's.

The official loop makes one update more than its schedule's 300 (its scheduler restarts there: 1e-7 x lr);
that update changes no weight by more than about 1e-10, so we take update 301's loss (computed before it)
and leave the update out. `--validate` then scores the validation documents in the reference's order in
batches of 16, as the official evaluation does.

The command is scripts/reference_parity.py (training/commands/parity.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import ConfigError

from ..config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]

SCHEDULE_STEPS = 300   # the official schedule's length; its loop makes one update more
# The setup every reference run shares (the reference README's "The setup").
COMMON = ["data.source=local", "data.packing=galore", "data.add_bos=true", "data.pad_id=0", "data.seq_len=256",
          "data.val_tokens=100000000", "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=16",
          "deepspeed.bf16.enabled=false", "deepspeed.gradient_clipping=0.0", "deepspeed.zero_optimization.stage=0",
          "optim.weight_decay=0.0", "optim.scheduler=cosine", "optim.warmup_ratio=0.1", "optim.min_lr_ratio=0.1",
          f"train.max_steps={SCHEDULE_STEPS}", "train.seed=0"]
# Each run's optimizer and method, as its README row describes the official command.
METHODS = {
    "full_rank_adamw": ["optim.name=adamw", "optim.lr=0.001", "optim.eps=1e-8"],
    # galore_torch's GaLoreAdamW default eps (1e-6) for both groups, as the official script leaves it
    "galore_adamw": ["optim.name=galore_adamw", "optim.lr=0.01", "optim.eps=1e-6", "optim.galore_rank=64",
                     "optim.galore_update_proj_gap=50", "optim.galore_scale=0.25", "optim.galore_proj_type=std"],
    # --velora_layers vd --num_groups 32,43 (M = 8 and 16) --velora_scale 1.5, float16 vectors and coefficients
    "velora_vd": ["optim.name=adamw", "optim.lr=0.001", "optim.eps=1e-8", "velora.targets=paper",
                  'velora.sub_token_overrides={"v_proj":8,"down_proj":16}', "velora.rank=1",
                  "velora.init=batch_average_once", "velora.coef_dtype=float16", "velora.grad_scale=1.5"],
}


def reference_config(reference: Path, method: str, extra: list[str] = ()) -> RunConfig:
    """Our run config of the reference's run `method` (the model from its config.json)."""
    batches = json.loads((reference / "batches.json").read_text())
    model = json.loads((reference / "config.json").read_text())
    sets = [*COMMON, *METHODS[method],
            f"data.path={(reference / batches['train_file']).resolve().parent}",
            f"data.tokenizer={(reference / '../../tokenizers/sp-bpe-32k.model').resolve()}",
            f"data.doc_order={reference / 'batches.json'}", f"train.init_from={reference / 'init_seed0.safetensors'}",
            *(f"model.{k}={json.dumps(model[k])}" for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                             "num_hidden_layers", "num_attention_heads",
                                                             "rms_norm_eps", "initializer_range",
                                                             "max_sequence_length")),
            *extra]
    return load_config(REPO / "configs" / "llama_20m.json", sets)


def check_reference(reference: Path, method: str, updates: int) -> dict:
    """The reference run `method` from losses.json; a one-line ConfigError when it cannot serve."""
    for name in ("README.md", "config.json", "batches.json", "losses.json", "init_seed0.safetensors"):
        if not (reference / name).is_file():
            raise ConfigError(f"--reference {reference}: no {name}; point it at ../shared/reference/official-galore-20m")
    run = json.loads((reference / "losses.json").read_text())["runs"][method]
    if not 1 <= updates <= len(run["train_loss"]):
        raise ConfigError(f"--updates {updates}: the reference has updates 1-{len(run['train_loss'])}")
    return run


def run_updates(cfg: RunConfig, updates: int, validate: bool, on_update=None, save: Path | None = None):
    """Train `cfg` for `updates` updates the way the trainer does; returns (per-update losses, our
    validation as `training.evaluate.evaluate` reports it, or None). `on_update(k, loss, lr)` after each;
    `save`: write the final weights there (safetensors, plain LLaMA names: a `train.init_from`)."""
    import torch

    from data import TrainBatches, load_tokenizer, validation_batches
    from training.build import build_engine, build_model, seed_everything
    from training.distributed import init_distributed
    from training.evaluate import evaluate
    from training.step import OptimizerStep

    dist = init_distributed()
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size)
    micro = cfg.deepspeed["train_micro_batch_size_per_gpu"]      # 16, no accumulation: the reference's batch
    batches = iter(TrainBatches(cfg.data, tokenizer, micro))
    model, _ = build_model(cfg)
    engine, _ = build_engine(model, cfg)
    step, losses = OptimizerStep(engine, batches, 1, dist), []
    for k in range(1, updates + 1):
        if k <= cfg.train.max_steps:
            loss, _, _, _, lr = step(k)
        else:   # the official loop's extra update: its loss, not the update (see the module docstring)
            input_ids, labels = next(batches)
            with torch.no_grad():
                loss, lr = float(engine.module(input_ids, labels=labels)), 0.0
        losses.append(loss)
        if on_update:
            on_update(k, loss, lr)
    if save is not None:
        from safetensors.torch import save_file

        from velora import strip_state_dict
        tmp = save.with_name(save.name + ".tmp")     # never a half-written file under the name asked for
        save_file({k: v.contiguous() for k, v in strip_state_dict(engine.module.state_dict()).items()}, str(tmp))
        tmp.replace(save)
    val = evaluate(engine.module, validation_batches(cfg.data, tokenizer, micro)) if validate else None
    return losses, val
