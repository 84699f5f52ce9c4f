"""Packing token lists into fixed-length (input_ids, labels) rows; labels are IGNORE (-100, the label
transformers and our model skip) where there is no token.

`concat` (default): every document is followed by EOS and the documents are joined into one stream
cut into rows of `seq_len`. With `data.add_bos` (the default for concat, LLaMA's convention) each
document starts with BOS (data/stream.py adds it; it is an input, never a target). The stream of one chunk of
documents ends in a partial row, padded and masked, so that chunks pack independently (which is what
makes sharding and resume exact; see data/stream.py).

`galore`: GaLore's pipeline tokenizes each document with T5's tokenizer, `max_length=seq_len,
truncation=True, padding="max_length"`: the tokens are cut to `seq_len - 1`, T5 appends EOS, the row
is right-padded with the pad id, and the training loop sets labels to -100 where input_ids == pad.
We do the same with any tokenizer (pad id, or EOS when it has none, as input filler), masking the
padding by position. One document gives one row; no BOS (T5 has none).
"""
from __future__ import annotations

import numpy as np

IGNORE = -100  # model/ uses the same value (it imports nothing of ours): HF's convention


def pack_concat(docs: list[list[int]], seq_len: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Join `docs` with EOS after each and cut into (n, seq_len) rows; the last row padded."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    rows = -(-total // seq_len)
    flat = np.full(rows * seq_len, pad_id, dtype=np.int64)
    if total:
        flat[:total] = eos_id
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        body = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
        # positions of the document tokens: every position before `total` except the EOS slots
        keep = np.ones(total, dtype=bool)
        keep[starts + lengths - 1] = False
        flat[:total][keep] = body
    labels = flat.copy()
    labels[total:] = IGNORE
    return flat.reshape(rows, seq_len), labels.reshape(rows, seq_len)


def pack_galore(docs: list[list[int]], seq_len: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One row per document: its first `seq_len - 1` tokens, EOS, then padding (labels -100)."""
    inputs = np.full((len(docs), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(docs), seq_len), IGNORE, dtype=np.int64)
    for i, d in enumerate(docs):
        n = min(len(d), seq_len - 1)
        inputs[i, :n] = d[:n]
        inputs[i, n] = eos_id
        labels[i, :n + 1] = inputs[i, :n + 1]
    return inputs, labels


def predicted_tokens(labels) -> int:
    """Positions a causal LM is trained or evaluated on in `labels` (rows aligned with the inputs): the
    model shifts, so position t predicts label t+1 and the first label of a row is never predicted."""
    return int((labels[:, 1:] != IGNORE).sum())


def processed_positions(labels) -> int:
    """Positions of `labels`' rows that hold a token, i.e. all but the padding, which both packings put only
    at the end of a row: up to each row's last label that is not IGNORE. Unlike `predicted_tokens`, a row's
    first position and a document's BOS count (the model processes them); a BOS in a row's very last
    position is taken for padding. What MFU is counted on."""
    real = np.asarray(labels) != IGNORE
    last = real.shape[1] - np.argmax(real[:, ::-1], axis=1)     # one past each row's last real label
    return int(np.where(real.any(axis=1), last, 0).sum())
