"""A training run as one stateful object: it owns the step, the tokens seen, the data position and the RNG
(`state_dict()` / `load_state_dict()`, what every checkpoint holds per rank), and runs setup, the loop,
evaluation, checkpoints and the export."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from data import TrainBatches, load_tokenizer, validation_batches

from .build import build_engine, build_model, seed_everything
from .config import RunConfig, resolve_batch
from .crash import GracefulStop, is_peer_failure, pause_point, peer_failure_message
from .deepspeed_config import check_deepspeed_section
from .collectives import barrier
from .distributed import init_distributed, launcher_env
from common.errors import CheckpointError, ConfigError, NonFiniteLoss, RunError
from .evaluate import evaluate
from .hf import save_final
from .metrics import Metrics, data_counts, describe_skips, flops_per_token, peak_flops
from .state import (DIVERGED_SUFFIX, TOKENIZER, RunDir, RunDirLock, atomic_copy, check_compatible, check_output_dir,
                    check_pickles, clean_stale, find_resume, load_checkpoint, mark_healthy, nonfinite_tensors,
                    rank_state_name, read_healthy, read_latest, rng_state, same_file, save_checkpoint, set_aside,
                    set_rng_state)
from .step import DataExhausted, OptimizerStep


class TrainingRun:
    """`TrainingRun(cfg, resume, stop_at).fit()`: train `cfg` to `train.max_steps` (or `stop_at`), resuming
    from `resume` (`auto` or a checkpoint path) when given. Construction checks everything that can be
    checked before a process group starts; `fit()` does the rest and returns the final evaluation (None
    when the run stopped early)."""

    def __init__(self, cfg: RunConfig, resume: str | None = None, stop_at: int | None = None,
                 local_rank: int | None = None, trust_checkpoint: bool = False):
        if stop_at is not None and stop_at < 1:
            raise ConfigError(f"--stop-at {stop_at}: expected a step >= 1")
        self.cfg, self.stop_at, self.local_rank = cfg, stop_at, local_rank
        self.dir = RunDir(Path(cfg.train.output_dir))
        check_output_dir(cfg.train.output_dir, resume)
        _, world_size, local_rank_here = launcher_env(local_rank)
        self.batch = resolve_batch(cfg.deepspeed, world_size)
        global_batch, micro, accum, _ = self.batch
        check_deepspeed_section(cfg.deepspeed, micro, accum)
        if cfg.deepspeed.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
            raise ConfigError("deepspeed.fp16.enabled=true: DeepSpeed refuses fp16 without a GPU; use "
                              "--set deepspeed.fp16.enabled=false --set deepspeed.bf16.enabled=true on CPU")
        cfg.deepspeed.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=micro,
                             gradient_accumulation_steps=accum)
        self.resume = resume
        self.resume_dir, self.notes = (find_resume(resume, self.dir.checkpoints, world_size) if resume
                                       else (None, []))
        if self.resume_dir is not None:
            self.notes += check_compatible(self.resume_dir, cfg)
            if not trust_checkpoint and local_rank_here == 0:   # one process per node reads them
                check_pickles(self.resume_dir)
        self.step, self.tokens_seen, self.saved_at, self.data_exhausted = 0, 0, 0, False
        self.verified_at, self.healthy = None, None   # training/state/health.py: verified weights and checkpoint
        self.batches = self.engine = self.metrics = self.lock = None

    # --- the state every checkpoint holds (one per rank) ----------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.dist.world_size,
                "data_exhausted": self.data_exhausted, "data": self.batches.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.data_exhausted = state.get("data_exhausted", False)
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])

    # --- phases --------------------------------------------------------------------------------
    def _phase(self, name: str, step: int) -> None:
        """Every point of the run that tests must be able to interrupt passes here (training/crash.py)."""
        pause_point(name, step)

    def _say(self, *lines: str) -> None:
        if self.dist.is_main:
            for line in lines:
                print(line, flush=True)

    def _setup_data(self) -> None:
        cfg, dist, micro = self.cfg, self.dist, self.batch[1]
        if not dist.is_main:
            barrier()  # the tokenizer and the built-in corpus are built once, by rank 0 first
        self.tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size)
        saved_tok = self.resume_dir / TOKENIZER if self.resume_dir is not None else None
        if saved_tok is not None and saved_tok.is_file() and not same_file(saved_tok, self.tokenizer.model_path):
            raise CheckpointError(f"{self.resume_dir}: the checkpoint was trained with another tokenizer than "
                                  f"{self.tokenizer.model_path} (same name, other contents); its token ids would "
                                  f"mean other text: resume with --set data.tokenizer={saved_tok}")
        self.val_batches = validation_batches(cfg.data, self.tokenizer, cfg.train.eval_batch_size or micro,
                                              rank=dist.rank, world_size=dist.world_size)
        if dist.is_main:
            barrier()
        self.batches = TrainBatches(cfg.data, self.tokenizer, micro, rank=dist.rank, world_size=dist.world_size,
                                    cuda=dist.device.type == "cuda")

    def _setup_model(self) -> None:
        model, summary = build_model(self.cfg)
        self.velora_summary = summary
        self._say(self._describe(model), *([str(summary)] if summary is not None else []))
        self.engine, notes = build_engine(model, self.cfg)
        self._say(*notes, *self.notes)
        if self.resume_dir is not None:
            state = load_checkpoint(self.engine, self.resume_dir, self.dist.rank)
            try:
                self.load_state_dict(state)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                what = f"has no {e} entry" if isinstance(e, KeyError) else f"holds an unusable entry ({e})"
                raise CheckpointError(f"{self.resume_dir / rank_state_name(self.dist.rank)} {what}: the checkpoint "
                                      f"is damaged or was not written by this project; resume from an earlier one "
                                      f"with --resume {self.resume_dir.parent}/step_N") from None
            self.saved_at = self.step
            healthy = read_healthy(self.dir.checkpoints)     # not one newer than this (skipped) checkpoint
            self.healthy = healthy if healthy and int(healthy.removeprefix("step_")) <= self.step else None
            self._say(f"resumed from {self.resume_dir} at step {self.step} ({self.tokens_seen} tokens seen)")

    def _setup_outputs(self) -> None:
        if self.dist.is_main:
            clean_stale(self.dir.checkpoints)
            self.cfg.save(self.dir.run_config)
            atomic_copy(self.tokenizer.model_path, self.dir.tokenizer)
        barrier()
        cfg, dist = self.cfg, self.dist
        peak, mfu_label = peak_flops(dist.device, cfg.bf16)
        self._say(mfu_label)
        self.metrics = Metrics(self.dir.root, is_main=dist.is_main, max_steps=cfg.train.max_steps,
                               start_step=self.step, log_every=cfg.train.log_every, device=dist.device,
                               world_size=dist.world_size, flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
                               peak=peak)
        self.metrics.run_config(cfg.to_dict())

    def _describe(self, model) -> str:
        cfg, dist, (g, m, a, note) = self.cfg, self.dist, self.batch
        n = sum(p.numel() for p in model.parameters())
        return (f"model: {n / 1e6:.2f}M parameters, {cfg.model.num_hidden_layers} layers, hidden "
                f"{cfg.model.hidden_size} | {dist.world_size} process(es) on {dist.device.type} ({dist.backend}) | "
                f"ZeRO {cfg.zero_stage}, {'bf16' if cfg.bf16 else 'fp32'} | global batch {g} = micro {m} x "
                f"accumulation {a} x {dist.world_size} ranks" + (f" ({note})" if note else "")
                + f" | pid {os.getpid()}")

    def save(self) -> None:
        """Save a checkpoint of this step; refused (the run stops) when a weight or optimizer-state tensor is
        not finite."""
        bad = nonfinite_tensors(self.engine.module, self.engine.optimizer)
        if bad:
            raise self._diverged(f"{bad} weight or optimizer-state tensor(s) hold inf or NaN after step {self.step}: "
                                 f"not saved")
        path = save_checkpoint(self.engine, self.dir.checkpoints, self.step, self.state_dict(), rank=self.dist.rank,
                               run_config=self.cfg, tokenizer_path=self.tokenizer.model_path,
                               keep_last=self.cfg.train.keep_last, on_phase=self._phase)
        self.saved_at = self.step
        self.metrics.print(f"saved checkpoint {path}")
        if self.verified_at == self.step:      # evaluated at this step: verified already
            self._verified(self.step)

    # --- health (training/state/health.py) ----------------------------------------------------------
    def _verified(self, step: int) -> None:
        """The weights as they were after `step` gave a finite loss: a checkpoint of them is verified healthy."""
        self.verified_at = step
        if step and self.saved_at == step and self.healthy != f"step_{step}":
            self.healthy = f"step_{step}"
            if self.dist.is_main:
                mark_healthy(self.dir.checkpoints, self.healthy)

    def _diverged(self, what: str) -> NonFiniteLoss:
        """The error that stops a diverged run, naming the last checkpoint verified healthy. A checkpoint saved
        since, never verified, is set aside (`step_N.diverged/`) and `latest` names the verified one again."""
        unverified = f"step_{self.saved_at}" if self.saved_at else None
        aside = ""
        if unverified and unverified != self.healthy:
            kept = unverified + DIVERGED_SUFFIX
            if self.dist.is_main:
                kept = set_aside(self.dir.checkpoints, unverified, self.healthy)
            aside = f"; {unverified} was saved but never verified and is kept aside as {kept}"
        return NonFiniteLoss(f"{what}; last checkpoint verified healthy: {self.healthy or 'none'}{aside} (lower "
                             f"optim.lr or set deepspeed.gradient_clipping, then --resume auto)")

    # --- the loop ------------------------------------------------------------------------------
    def _train_step(self, step_fn: OptimizerStep) -> None:
        from velora import stored_bytes

        t0 = time.perf_counter()
        try:
            loss, step_tokens, positions, grad_norm, lr = step_fn(self.step + 1)
        except NonFiniteLoss as e:
            raise self._diverged(str(e)) from None
        self._verified(self.step)     # this step's finite loss came from the weights of the step before
        self.step += 1
        self.tokens_seen += step_tokens
        self.metrics.train_step(self.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_seen=self.tokens_seen,
                                step_tokens=step_tokens, step_positions=positions, step_time=time.perf_counter() - t0,
                                velora_bytes=stored_bytes(self.engine.module) if self.velora_summary else None)

    def _evaluate(self) -> dict:
        result = self._checked_evaluation()
        self._phase("eval", self.step)
        self.metrics.evaluation(self.step, result)
        self.metrics.data(self.step, data_counts(self.batches.stats))
        return result

    def _checked_evaluation(self) -> dict:
        """Evaluate; a non-finite validation loss stops the run as a diverged one, a finite one verifies the
        weights of this step."""
        result = evaluate(self.engine.module, self.val_batches)
        if not math.isfinite(result["loss"]):
            raise self._diverged(f"non-finite validation loss ({result['loss']}) at step {self.step}: not saved")
        self._verified(self.step)
        return result

    def fit(self) -> dict | None:
        """Train to the end (or `stop_at`, or a signal); export `final/` and return the final evaluation."""
        self.dist = init_distributed(self.local_rank, self.cfg.train.collective_timeout_s)
        if self.dist.is_main:
            self.lock = RunDirLock(self.dir.root).acquire()
        try:
            if self.dist.is_main:  # again, now that no other process can write here
                check_output_dir(self.cfg.train.output_dir, self.resume)
            seed_everything(self.cfg.train.seed)
            self._setup_data()
            self._setup_model()
            if self._stopped_before_start():
                return None
            self._setup_outputs()
            return self._train()
        except RuntimeError as e:
            if not is_peer_failure(e):
                raise
            raise RunError(peer_failure_message(e, self.dist.rank, self.dist.world_size,
                                                self.cfg.train.collective_timeout_s, self._last_checkpoint())) from None
        finally:
            if self.lock is not None:
                self.lock.release(cleanup=True)

    def _train(self) -> dict | None:
        try:
            result = self._loop()
            return self._finish(result) if result is not False else None
        except OSError as e:     # a full disk between saves (a save itself raises CheckpointError): the log, events
            raise RunError(f"{e.filename or self.dir.root}: {e.strerror or e} after step {self.step}; the last "
                           f"checkpoint is {self._last_checkpoint()}; free space or fix permissions, then resume "
                           f"with --resume auto") from None

    def _last_checkpoint(self) -> str:
        tag = read_latest(self.dir.checkpoints, strict=False)
        return str(self.dir.checkpoints / tag) if tag else f"none (nothing saved in {self.dir.checkpoints} yet)"

    def _stopped_before_start(self) -> bool:
        """--stop-at at or below the resumed step: train nothing (a requeued job that already reached it)."""
        if self.stop_at is None or self.step < self.stop_at or self.step >= self.cfg.train.max_steps:
            return False
        self._say(f"--stop-at {self.stop_at}: the run is already at step {self.step} ({self.resume_dir}); "
                  f"nothing to train; continue with a later --stop-at or without it")
        return True

    def _loop(self):
        """Returns the last evaluation (None when none ran), or False when the run stopped early."""
        cfg, result = self.cfg, None
        stop = GracefulStop()  # from here on SIGTERM/SIGINT/SIGHUP/SIGUSR1 mean: save at the next step, exit 0
        step_fn = OptimizerStep(self.engine, iter(self.batches), self.batch[2], self.dist, stop, self._phase)
        try:
            while self.step < cfg.train.max_steps and not self.data_exhausted:
                try:
                    self._train_step(step_fn)
                except DataExhausted:
                    self.data_exhausted = True
                    self.metrics.print(f"data.epochs={cfg.data.epochs}: the training data ran out after step "
                                       f"{self.step} of {cfg.train.max_steps}; ending the run here")
                    if self.step > self.saved_at:
                        self.save()
                    result = self._evaluate() if self.step else None
                    break
                last = self.step == cfg.train.max_steps
                if self.step % cfg.train.eval_every == 0 or last:
                    try:
                        result = self._evaluate()
                    except NonFiniteLoss:
                        raise                # diverged: nothing to save
                    except Exception as e:
                        if not is_peer_failure(e):   # (then the save's barrier would wait for the dead peer again)
                            self.save()      # an evaluation that fails must not cost the steps since the last save
                        raise
                stopping = self.step == self.stop_at or step_fn.stop_requested
                if self.step % cfg.train.save_every == 0 or last or stopping:
                    self.save()
                if stopping and not last:
                    why = "--stop-at" if self.step == self.stop_at else stop.signal or "a signal on another rank"
                    self.metrics.print(f"stopped after step {self.step} ({why}); checkpoint step_{self.step} saved; "
                                       f"continue with --resume auto")
                    return False
        finally:
            stop.restore()
            self.metrics.close()
        return result

    def _finish(self, result: dict | None) -> dict:
        if result is None:  # resumed a finished run: evaluate what the checkpoint holds
            result = self._checked_evaluation()
        final = save_final(self.engine.module, self.cfg, self.tokenizer.model_path, self.dir.final, overwrite=True,
                           progress={"step": self.step, "tokens_seen": self.tokens_seen})
        self._say(f"exported {final} (last checkpoint: step {self.saved_at})",
                  describe_skips(data_counts(self.batches.stats)),
                  f"final validation: ppl {result['ppl']:.2f} (token-weighted), galore_ppl {result['galore_ppl']:.2f}, "
                  f"{result['tokens']} tokens")
        return result

