"""Validation loss and perplexity: the token-weighted figure, and GaLore's figure beside it."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from data import DataError
from data.packing import predicted_tokens
from data.sources import DOCUMENT_SUFFIXES

from .collectives import all_reduce_values, world_size
from .config import resolve_batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> dict:
    """Evaluate `model` on `batches` (an iterable of `(input_ids, labels)`, labels aligned with the
    inputs and data.packing.IGNORE where nothing is predicted).

    Returns a dict:
      - `loss`: mean loss over every predicted token (each batch weighted by its number of predicted
        tokens), summed over all ranks when torch.distributed is initialised; `ppl` = exp(loss).
      - `galore_loss` / `galore_ppl`: GaLore's figure (see below), comparable with its tables.
      - `tokens`: predicted tokens evaluated (all ranks); `batches`: batches evaluated (all ranks).

    Pass the plain module (`engine.module` for a DeepSpeed engine). Runs in eval mode under no_grad
    and restores the mode the model was in.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, batch_loss_sum = 0.0, 0.0
    tokens, n_batches = 0, 0
    try:
        for input_ids, labels in batches:
            n = predicted_tokens(labels)    # counted on the host batch: no device sync per batch
            input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            mean = model(input_ids, labels=labels).double()     # summed on the device
            loss_sum += mean * n
            batch_loss_sum += mean
            tokens += n
            n_batches += 1
    finally:
        model.train(was_training)

    # GaLore's evaluate_model starts its batch counter at 1, so it divides the summed per-batch mean
    # losses by (batches + 1); each rank computes that on its share and the ranks' figures are averaged.
    galore_loss = batch_loss_sum / (n_batches + 1)
    loss_sum, galore_loss, tokens, n_batches = all_reduce_values([loss_sum, galore_loss, tokens, n_batches])
    tokens, n_batches = int(tokens), int(n_batches)
    galore_loss /= world_size()
    if tokens == 0:
        raise ValueError("evaluate: the validation batches hold no predicted tokens (all labels are ignored "
                         "or there are no batches); raise data.val_tokens")
    loss = loss_sum / tokens
    return {"loss": loss, "ppl": _exp(loss), "galore_loss": galore_loss, "galore_ppl": _exp(galore_loss),
            "tokens": tokens, "batches": n_batches}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def data_source(src: str) -> dict:
    """--data value -> the DataConfig fields it sets."""
    if src in ("c4", "builtin"):
        return {"source": src, "path": ""}
    path = Path(src)
    if path.is_dir() or (path.is_file() and path.name.endswith(DOCUMENT_SUFFIXES)):
        return {"source": "local", "path": str(path)}
    raise DataError(f"--data {src}: expected c4, builtin, a directory of C4 shards or a file of documents "
                    f"({', '.join(DOCUMENT_SUFFIXES)}), and no such file or directory exists")


def eval_batch_size(run_config) -> int:
    """The batch size the training run evaluated with: train.eval_batch_size, else the micro-batch
    (which the saved config holds once resolved for the run's world size)."""
    ds = run_config.deepspeed
    return (run_config.train.eval_batch_size or ds.get("train_micro_batch_size_per_gpu")
            or resolve_batch(ds, 1)[1])


def evaluate_checkpoint(checkpoint, data: str, *, split: str = "validation", skip_tokens: int | None = None,
                        max_tokens: int | None = None, seq_len: int | None = None, batch_size: int | None = None,
                        device: str = "cpu", trust: bool = False, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """Load `checkpoint` (final/, a run directory or a DeepSpeed checkpoint) and evaluate it on `data` (see
    `data_source`). Unset options take the run's own settings, so the numbers equal the in-training
    evaluation's. Returns (`evaluate`'s result, the settings used)."""
    from data import validation_batches

    from .hf import load_source, resolve_checkpoint

    src = resolve_checkpoint(checkpoint)
    model, run_config, tokenizer = load_source(src, device=device, trust=trust, allow_nonfinite=allow_nonfinite)
    changes = data_source(data)
    if skip_tokens is not None:
        changes["val_skip_tokens"] = skip_tokens
    if max_tokens:
        changes["val_tokens"] = max_tokens
    if seq_len:
        if seq_len > run_config.model.max_sequence_length:
            raise DataError(f"--seq-len {seq_len}: longer than the model's max_sequence_length "
                            f"({run_config.model.max_sequence_length}); use at most that")
        changes["seq_len"] = seq_len
    data_cfg = dataclasses.replace(run_config.data, **changes)
    batch_size = batch_size or eval_batch_size(run_config)
    result = evaluate(model, validation_batches(data_cfg, tokenizer, batch_size, split=split))
    used = {"checkpoint": str(src.dir), "format": src.kind, "data": data, "split": split,
            "source": data_cfg.source, "path": data_cfg.path, "seq_len": data_cfg.seq_len,
            "packing": data_cfg.packing, "val_tokens": data_cfg.val_tokens, "skip_tokens": data_cfg.val_skip_tokens,
            "batch_size": batch_size, "device": device}
    return result, used
