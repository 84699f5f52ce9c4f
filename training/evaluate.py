"""Validation loss and perplexity: the token-weighted figure, and GaLore's figure beside it."""
from __future__ import annotations

import math

import torch

from data.packing import predicted_tokens

from .collectives import all_reduce_values, world_size


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
