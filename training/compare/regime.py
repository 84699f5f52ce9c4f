"""The training regime of a comparison (scripts/compare_galore.py), stated before any result: the model's
size, the tokens it saw against its parameters and the training data, the optimizer steps, and when each
run left the unigram plateau (a small model first learns token frequencies, sits near that loss for a
while, then learns context; a budget spent mostly on the plateau measures when a run escapes it, not
how good a method is)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# "Clearly below the unigram loss": at least this many nats below it (a perplexity 22% below the unigram
# model's). It exceeds both the noise of a fixed evaluation slice (~0.01 nats) and the gap between the
# unigram entropy of the training split and the unigram model's loss on validation text.
ESCAPE_MARGIN = 0.25


def train_split_stats(cfg) -> dict:
    """One pass over the training split as training packs it: {"train_tokens": token positions per pass,
    "unigram_loss": entropy in nats of the predicted tokens' frequencies}, the loss of the best model that
    ignores context (it predicts each token with its training-split frequency)."""
    from data import TrainBatches, load_tokenizer
    from data.packing import IGNORE

    data = dataclasses.replace(cfg.data, epochs=1, num_workers=0)
    counts = np.zeros(cfg.model.vocab_size, dtype=np.int64)
    positions = 0
    for inputs, labels in TrainBatches(data, load_tokenizer(data, cfg.model.vocab_size), 64):
        positions += inputs.numel()
        lab = labels[labels != IGNORE].numpy()
        counts += np.bincount(lab, minlength=cfg.model.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return {"train_tokens": positions, "unigram_loss": float(-(p * np.log(p)).sum())}


def escape_step(curve: list, tokens_per_step: int, unigram_loss: float) -> int | None:
    """The step of a run's first evaluation at least ESCAPE_MARGIN below the unigram loss (`curve`:
    [(tokens, loss)] with tokens = steps x tokens per step); None when it never got there."""
    for tokens, loss in curve:
        if loss <= unigram_loss - ESCAPE_MARGIN:
            return round(tokens / tokens_per_step)
    return None


def regime_lines(rows: list[dict], facts: dict) -> list[str]:
    """The regime block of results.md; also sets each row's `escape_step`."""
    base, steps = facts["base"], facts["steps"]
    params = next((r["params"] for r in rows if r.get("params")), None)
    unigram = facts.get("unigram_loss")
    warmup = math.ceil(base.optim.warmup_ratio * steps)
    clip = base.deepspeed.get("gradient_clipping", 0.0)
    out = ["Regime (every method):", ""]
    out.append(f"- parameters: {params:,}" if params else "- parameters: not measured (no run completed)")
    out.append(f"- training tokens per run: {facts['tokens']:,} ({steps:,} optimizer steps × "
               f"{facts['tokens_per_step']:,} tokens)"
               + (f"; {facts['tokens'] / params:.2f} tokens per parameter" if params else ""))
    if facts.get("train_tokens"):
        out.append(f"- passes over the training data: {facts['tokens'] / facts['train_tokens']:.2f} "
                   f"(its training split packs into {facts['train_tokens']:,} token positions)")
    out.append(f"- schedule: {base.optim.scheduler}, {warmup} warmup steps (warmup_ratio {base.optim.warmup_ratio:g}), "
               f"gradient clipping {clip:g}" + (" (none)" if not clip else ""))
    if unigram is None:
        return out + [""]
    out.append(f"- unigram loss: {unigram:.3f} nats (ppl {math.exp(unigram):.1f}): the entropy of the training "
               f"split's token frequencies, counted over one pass as training packs it")
    out.append(f"- plateau escape: a run's first evaluation at least {ESCAPE_MARGIN} nats below the unigram loss "
               f"(evaluations every {facts.get('eval_every', '?')} steps); per reported run, by seed:")
    by_method = {}
    for r in rows:
        if r.get("curve"):
            r["escape_step"] = escape_step(r["curve"], facts["tokens_per_step"], unigram)
        if r.get("phase") == "report" and r.get("selected"):
            by_method.setdefault(r["method"], []).append(r)
    for m, runs in by_method.items():
        cells = [f"{r['seed']}: " + (f"step {r['escape_step']}" if r.get("escape_step") is not None else "never")
                 for r in sorted(runs, key=lambda r: r["seed"])]
        out.append(f"  - {m}: " + ", ".join(cells))
    return out + [""]
