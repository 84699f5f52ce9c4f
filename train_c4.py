"""Pre-train a LLaMA model on C4 (or the built-in corpus) with DeepSpeed ZeRO, optionally with VeLoRA.

    python train_c4.py --config configs/llama_tiny.json                  # one process
    deepspeed --num_gpus 8 train_c4.py --config configs/llama_350m.json  # or torchrun --nproc_per_node 8
    python train_c4.py --config CFG --set train.max_steps=200 --set optim.lr=1e-3 --resume auto

Writes under train.output_dir: config.json, tokenizer.model, train_log.jsonl, tensorboard/,
checkpoints/step_N/ + latest, and final/ (model.safetensors, config.json, tokenizer.model). The
last line printed is the final validation perplexity.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time

from data import DataError, TrainBatches, load_tokenizer, validation_batches
from training.checkpoint import (check_compatible, clean_stale, find_resume, load_checkpoint, rng_state,
                                 save_checkpoint, set_rng_state)
from training.config import ConfigError, load_config, resolve_batch
from training.crash import GracefulStop, pause_point
from training.distributed import barrier, init_distributed, launcher_env, shutdown
from training.errors import CheckpointError
from training.evaluate import evaluate
from training.export import save_final
from training.metrics import Metrics, data_counts, describe_skips, flops_per_token, peak_flops
from training.optim import check_optimizer_config
from training.trainer import (NonFiniteLoss, RunError, Trainer, build_engine, build_model, check_model_data,
                              check_output_dir, describe, output_paths, seed_everything)
from velora import stored_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config JSON (configs/llama_*.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from checkpoints/latest (auto; starts fresh when there is none) or a checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="save a checkpoint and exit after this step (for job time limits); continue with --resume auto")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def train(args) -> None:
    # --- config and checks: nothing is built or written until they pass ---
    cfg = load_config(args.config, args.set)
    check_optimizer_config(cfg)
    check_model_data(cfg)
    check_output_dir(cfg.train.output_dir, args.resume)
    world_size = launcher_env(args.local_rank)[1]
    batch = resolve_batch(cfg.deepspeed, world_size)
    global_batch, micro, accum, _ = batch
    cfg.deepspeed.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=micro,
                         gradient_accumulation_steps=accum)
    run_dir, ckpt_root = output_paths(cfg)
    resume_dir, resume_notes = find_resume(args.resume, ckpt_root, world_size) if args.resume else (None, [])
    if resume_dir is not None:
        resume_notes += check_compatible(resume_dir, cfg)

    dist = init_distributed(args.local_rank)
    say = print if dist.is_main else (lambda *a, **k: None)
    seed_everything(cfg.train.seed)

    # --- data: the tokenizer and the built-in corpus are built once, by rank 0 first ---
    if not dist.is_main:
        barrier()  # wait for rank 0 to fill the caches
    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size)
    val_batches = validation_batches(cfg.data, tokenizer, cfg.train.eval_batch_size or micro,
                                     rank=dist.rank, world_size=dist.world_size)
    if dist.is_main:
        barrier()
    batches = TrainBatches(cfg.data, tokenizer, micro, rank=dist.rank, world_size=dist.world_size)

    # --- model, VeLoRA, optimizer, schedule, DeepSpeed ---
    model, velora_summary = build_model(cfg)
    say(describe(cfg, model, dist, batch))
    if velora_summary is not None:
        say(str(velora_summary))
    engine, notes = build_engine(model, cfg)
    for note in notes:
        say(note)

    # --- resume, then the output directory ---
    step, tokens_seen = 0, 0
    for note in resume_notes:
        say(note)
    if resume_dir is not None:
        state = load_checkpoint(engine, resume_dir, dist.rank)
        step, tokens_seen = state["step"], state["tokens_seen"]
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        say(f"resumed from {resume_dir} at step {step} ({tokens_seen} tokens seen)")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(ckpt_root)
        cfg.save(run_dir / "config.json")
        shutil.copyfile(tokenizer.model_path, run_dir / "tokenizer.model")
    barrier()

    # --- the loop ---
    bf16 = bool(cfg.deepspeed.get("bf16", {}).get("enabled"))
    n_no_embed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    peak, mfu_label = peak_flops(dist.device, bf16)
    say(mfu_label)
    metrics = Metrics(run_dir, is_main=dist.is_main, max_steps=cfg.train.max_steps, start_step=step,
                      log_every=cfg.train.log_every, device=dist.device, world_size=dist.world_size,
                      flops_per_token=flops_per_token(cfg.model, n_no_embed), peak=peak)
    stop = GracefulStop()  # from here on SIGTERM/SIGINT mean: save at the next step boundary, exit 0
    trainer = Trainer(engine, iter(batches), accum, dist, stop)

    def save(at: int):
        state = {"step": at, "tokens_seen": tokens_seen, "world_size": dist.world_size,
                 "data": batches.state_dict(), "rng": rng_state()}
        path = save_checkpoint(engine, ckpt_root, at, state, rank=dist.rank, run_config=cfg,
                               tokenizer_path=tokenizer.model_path, keep_last=cfg.train.keep_last)
        metrics.print(f"saved checkpoint {path}")

    result, saved_at = None, step
    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            try:
                loss, step_tokens, grad_norm, lr = trainer.step(step + 1)
            except NonFiniteLoss as e:
                raise RunError(f"{e}; last good checkpoint: {f'step_{saved_at}' if saved_at else 'none'} "
                               f"(lower optim.lr or set deepspeed.gradient_clipping, then --resume auto)") from None
            step += 1
            tokens_seen += step_tokens
            metrics.train_step(step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_seen=tokens_seen,
                               step_tokens=step_tokens, step_time=time.perf_counter() - t0,
                               velora_bytes=stored_bytes(engine.module) if velora_summary else None)
            if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                result = evaluate(engine.module, val_batches)
                pause_point("eval", step)
                metrics.evaluation(step, result)
                metrics.data(step, data_counts(batches.stats, dist.device))
            stopping = step == args.stop_at or trainer.stop_requested
            if step % cfg.train.save_every == 0 or step == cfg.train.max_steps or stopping:
                save(step)
                saved_at = step
            if stopping and step < cfg.train.max_steps:
                why = "--stop-at" if step == args.stop_at else stop.signal or "a signal on another rank"
                metrics.print(f"stopped after step {step} ({why}); checkpoint step_{step} saved; continue "
                              f"with --resume auto")
                return
    finally:
        stop.restore()
        metrics.close()

    # --- export and the final figure ---
    if result is None:  # resumed a finished run: evaluate what the checkpoint holds
        result = evaluate(engine.module, val_batches)
    final = save_final(engine.module, cfg, tokenizer.model_path, run_dir / "final")
    say(f"exported {final} (last checkpoint: step {saved_at})")
    say(describe_skips(data_counts(batches.stats, dist.device)))
    say(f"final validation: ppl {result['ppl']:.2f} (token-weighted), galore_ppl {result['galore_ppl']:.2f}, "
        f"{result['tokens']} tokens")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ConfigError, DataError, CheckpointError, RunError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
