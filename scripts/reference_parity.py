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

    python scripts/reference_parity.py --reference ../shared/reference/official-galore-20m \\
        --method full_rank_adamw --updates 30

The last line is `max |loss - reference| over updates 1-N: X`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.config import RunConfig, load_config  # noqa: E402
from common.errors import ConfigError  # noqa: E402

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path, help="the reference directory (its README describes it)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--updates", type=int, default=30, help="updates 1-N to compare (the reference has 301)")
    p.add_argument("--validate", action="store_true", help="score the validation documents after the updates")
    p.add_argument("--save", type=Path, metavar="FILE", help="write the final weights here (safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an override on top of the reference's setup (to test what matters)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    run = check_reference(args.reference, args.method, args.updates)
    cfg = reference_config(args.reference, args.method, args.set)
    ref, t0 = run["train_loss"], time.perf_counter()
    print(f"{args.method}: {run['description']}; lr {run['lr']}; our trainer from the reference's initial weights "
          f"and batches", flush=True)
    print(f"{'update':>6} {'lr':>10} {'ours':>10} {'reference':>10} {'|diff|':>9} {'s':>6}", flush=True)

    def show(k, loss, lr):
        print(f"{k:>6} {lr:>10.3e} {loss:>10.6f} {ref[k - 1]:>10.6f} {abs(loss - ref[k - 1]):>9.2e} "
              f"{time.perf_counter() - t0:>6.0f}", flush=True)

    losses, val = run_updates(cfg, args.updates, args.validate, show, args.save)
    if val is not None:
        mean_of_means = val["galore_loss"] * (val["batches"] + 1) / val["batches"]
        print(f"validation after update {args.updates}: mean of batch means {mean_of_means:.6f} (reference "
              f"{run['eval_loss_mean_of_batch_means']:.6f}, |diff| {abs(mean_of_means - run['eval_loss_mean_of_batch_means']):.2e}); "
              f"the official figure {val['galore_loss']:.6f} (reference {run['eval_loss_official_figure']:.6f}); "
              f"token-weighted {val['loss']:.6f} over {val['tokens']} targets in {val['batches']} batches")
    worst = max(abs(a - b) for a, b in zip(losses, ref))
    print(f"max |loss - reference| over updates 1-{args.updates}: {worst:.6g}")


if __name__ == "__main__":
    from training import cli
    from training.distributed import shutdown

    try:
        sys.exit(cli.run(main, prog=cli.prog()))
    finally:
        shutdown()
