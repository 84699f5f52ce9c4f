"""Training batches: shuffled, sharded across ranks and DataLoader workers, resumable, epoch after epoch.

The unit of everything is the *chunk*: `data.shuffle_buffer` consecutive records of one shard.
A chunk is read, its documents are shuffled (seeded by seed, epoch, shard and chunk), tokenized and
packed on its own (data/packing.py), so the rows of a chunk do not depend on who reads it.

Sharding. There are N = world_size x max(workers, 1) readers (workers: `data.num_workers` resolved, see
DataConfig.loader); reader r*K + w is rank r's worker w. Each epoch visits the shards in an order
shuffled with seed + epoch.
- Shard level, when the shards split evenly, or there are >= 64 per reader, or they are the Hub's
  (C4: 1024 train shards) and there are at least N: reader i reads the shards at positions
  p = i mod N and never opens the others.
- Chunk level, otherwise (few local shards, e.g. one file): every reader streams every shard and
  packs only chunk k of shard position p when (p + k) mod N = i, reading the other chunks' lines
  without parsing them. A shard with fewer than N x shuffle_buffer lines is cut into N chunks.
Readers see disjoint rows; their union is the single-reader stream whenever the chunking is the
same for both (shards that split evenly, or hold at least N x shuffle_buffer lines each).

Resume. A reader's position is (epoch, shard position, chunk, row), saved with every batch.
Restoring it skips earlier shards without opening them and the lines of earlier chunks of the
current shard without parsing them (builtin and local: gzip decompression only; c4: the shard is
streamed from the Hub and dropped up to there), then re-tokenizes that one chunk and drops its
rows already seen: the resumed run continues with exactly the next unseen row.

Epochs. When a reader has read its part of the train split it starts the next epoch (shard order
and chunk shuffles reseeded with seed + epoch); `data.epochs` > 0 stops after that many.

A fixed order (`data.doc_order`, data/order.py) replaces all of this: the listed documents, batch after
batch, dealt to ranks by micro-batch, one row each; the position is the number of micro-batches consumed.
"""
from __future__ import annotations

import logging
import math
import random
from collections import Counter
from itertools import islice

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.config import DataConfig
from common.errors import DataError
from data.order import ordered_records, read_doc_order
from data.packing import IGNORE, pack_concat, pack_galore
from data.sources import check_bad_fraction, parse_record, split_shards

STATE_VERSION = 1
VAL_CHUNK_DOCS = 4096   # validation chunking is fixed so the slice does not depend on data.shuffle_buffer
log = logging.getLogger(__name__)


def _shard_level(shards: list, n_readers: int) -> bool:
    """Whole shards per reader when that is balanced, or when streaming every shard N times would mean
    downloading it N times (Hub shards, whose length is unknown)."""
    n = len(shards)
    return n >= n_readers and (n % n_readers == 0 or n >= 64 * n_readers or shards[0].count is None)


def pack_chunk(cfg: DataConfig, tokenizer, lines: list, shuffle_key: str | None):
    """Parse, shuffle (seeded by `shuffle_key`; None keeps file order), tokenize and pack one chunk of
    records; returns (inputs, labels, counts)."""
    counts = Counter()
    texts = [t for r in lines if (t := parse_record(r, counts)) is not None]
    if shuffle_key is not None:
        random.Random(shuffle_key).shuffle(texts)
    ids = tokenizer.encode_batch(texts)
    counts["docs"] += len(ids)
    if not ids:
        return (), (), counts
    if cfg.packing == "galore":
        counts["truncated_docs"] += sum(len(d) >= cfg.seq_len for d in ids)
    pad = cfg.pad_id if cfg.pad_id >= 0 else tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    pack = pack_galore if cfg.packing == "galore" else pack_concat
    if cfg.bos:
        ids = [[tokenizer.bos_id] + d for d in ids]
    inputs, labels = pack(ids, cfg.seq_len, tokenizer.eos_id, pad)
    if cfg.bos:
        labels[inputs == tokenizer.bos_id] = IGNORE        # BOS starts a document; it is never a target
    counts["tokens"] += int((labels != IGNORE).sum())
    return inputs, labels, counts


def read_rows(cfg: DataConfig, tokenizer, shards: list, reader: int, n_readers: int, pos: dict,
              stats: Counter, chunk_docs: int, shuffle: bool = True, epochs: int = 0):
    """Yield this reader's packed (input_ids, labels) rows (numpy, seq_len each) from `pos` on.

    `pos` is updated in place to the position of the next row *before* each row is yielded, and
    `stats` gets the counts of every finished chunk (so a saved `pos` + `stats` pair never counts a
    chunk twice when it is re-read on resume); `pos["open"]` holds the counts of the current one.
    """
    by_shard = _shard_level(shards, n_readers)
    while not (epochs and pos["epoch"] >= epochs):
        epoch = pos["epoch"]
        order = list(range(len(shards)))
        if shuffle:
            random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        yielded = (pos["shard"], pos["chunk"], pos["row"]) != (0, 0, 0)
        for p in range(pos["shard"], len(shards)):
            if by_shard and p % n_readers != reader:
                continue
            shard = shards[order[p]]
            size = chunk_docs
            if not by_shard and shard.count is not None:
                size = max(1, min(size, math.ceil(shard.count() / n_readers)))
            records, seen, k = shard.records(), Counter(), 0
            while lines := list(islice(records, size)):
                if (by_shard or (p + k) % n_readers == reader) and k >= pos["chunk"]:
                    key = f"{cfg.seed}:{epoch}:{shard.name}:{k}" if shuffle else None
                    inputs, labels, counts = pack_chunk(cfg, tokenizer, lines, key)
                    seen.update(counts)
                    pos["open"] = dict(counts)
                    for j in range(pos["row"], len(inputs) - 1):
                        pos["row"] = j + 1
                        yielded = True
                        yield inputs[j], labels[j]
                    stats.update(counts)  # the chunk is done once its last row is out
                    pos.update(chunk=k + 1, row=0, open={})
                    if len(inputs):
                        yielded = True
                        yield inputs[-1], labels[-1]
                k += 1
            if k == 0:
                stats["empty_shards"] += 1
            check_bad_fraction(seen, shard.name, cfg.max_bad_fraction)
            pos.update(shard=p + 1, chunk=0, row=0, open={})
        if not yielded:
            raise DataError(f"data: reader {reader} of {n_readers} got no documents in epoch {epoch} (the split "
                            f"has too little text for {n_readers} readers); use fewer workers/ranks or more data")
        pos.update(epoch=epoch + 1, shard=0, chunk=0, row=0, open={})


def _start_pos() -> dict:
    return {"epoch": 0, "shard": 0, "chunk": 0, "row": 0, "open": {}}


def _slot_batches(cfg: DataConfig, tokenizer, shards: list, batch_size: int, rank: int, world_size: int,
                  slots: int, slot: int, pos: dict, stats: Counter):
    """Batches of reader slot `slot` of this rank's `slots`, each with the slot's position and counts after it."""
    rows = read_rows(cfg, tokenizer, shards, rank * slots + slot, world_size * slots, pos, stats,
                     cfg.shuffle_buffer, epochs=cfg.epochs)
    while batch := list(islice(rows, batch_size)):
        inputs, labels = _stack(batch)
        yield inputs, labels, slot, {**pos, "open": dict(pos["open"])}, dict(stats)
    yield None, None, slot, dict(pos), dict(stats)  # a finite stream's final position and counts


def _ordered_rows(cfg: DataConfig, tokenizer, records: list):
    inputs, labels, _ = pack_chunk(cfg, tokenizer, records, None)
    yield from zip(inputs, labels)


def replay_batches(cfg: DataConfig, tokenizer, shards: list, batch_size: int, rank: int, world_size: int,
                   start: int, pos: dict, stats: Counter):
    """`data.doc_order`'s training batches, in `_slot_batches`' form: micro-batch i of this rank holds the
    documents (i x world_size + rank) x batch_size onwards of `train_order`, one row each; from micro-batch
    `start` on (a resumed run's)."""
    records = ordered_records(shards, read_doc_order(cfg, "train"), "train")
    i = start
    while chunk := records[(i * world_size + rank) * batch_size:(i * world_size + rank + 1) * batch_size]:
        inputs, labels, counts = pack_chunk(cfg, tokenizer, chunk, None)
        stats.update(counts)
        i += 1
        pos.update(row=i * batch_size)
        yield torch.from_numpy(inputs), torch.from_numpy(labels), 0, dict(pos), dict(stats)
    yield None, None, 0, dict(pos), dict(stats)


class _Slots(IterableDataset):
    """DataLoader worker w serves reader slot (first + w) mod K, so a resumed loader keeps the order.
    (It holds copies, not the TrainBatches: a reference cycle would stall the workers' shutdown.)"""

    def __init__(self, args: tuple, positions: list, stats: list, first: int):
        self.args, self.positions, self.stats, self.first = args, positions, stats, first

    def __iter__(self):
        slot = (self.first + get_worker_info().id) % len(self.positions)
        try:
            yield from _slot_batches(*self.args, slot, self.positions[slot], self.stats[slot])
        except DataError as e:  # handed over as is: the DataLoader would wrap it in a worker traceback
            yield e


class TrainBatches:
    """Iterator of (input_ids, labels) LongTensors of shape (batch_size, seq_len) for one rank.

    `.stats` counts what was read and skipped (docs, tokens, empty_docs, bad_json, bad_utf8,
    missing_text, blank_lines, empty_shards, truncated_docs) and the current `epoch`.
    `state_dict()` / `load_state_dict()` resume at the next unseen row (see the module docstring);
    the state is per rank: save every rank's. `cuda`: batches are for a GPU (`data.num_workers` and
    `data.pin_memory` resolved for it: workers and page-locked batches by default).
    """

    def __init__(self, cfg: DataConfig, tokenizer, batch_size: int, rank: int = 0, world_size: int = 1,
                 cuda: bool = False):
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise DataError(f"data: bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.cfg, self.tokenizer, self.batch_size = cfg, tokenizer, batch_size
        self.rank, self.world_size = rank, world_size
        self.workers, self.pin = cfg.loader(cuda)
        self.slots = max(self.workers, 1)
        self.shards = split_shards(cfg, "train")
        self._pos = [_start_pos() for _ in range(self.slots)]
        self._stats = [Counter() for _ in range(self.slots)]
        self._consumed = 0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            args = (self.cfg, self.tokenizer, self.shards, self.batch_size, self.rank, self.world_size, self.slots)
            positions, stats = [dict(p) for p in self._pos], [Counter(s) for s in self._stats]
            if self.cfg.doc_order:
                self._it = replay_batches(*args[:-1], self._consumed, positions[0], stats[0])
            elif self.workers == 0:
                self._it = _slot_batches(*args, 0, positions[0], stats[0])
            else:
                # A worker tokenizes a whole chunk before its first row; batches of about two chunks queued
                # per worker let the others (and its own queue) feed training meanwhile, instead of the 2
                # batches by default. What is queued is not consumed: the saved position stays exact.
                ahead = max(2, math.ceil(2 * self.cfg.shuffle_buffer / self.batch_size))
                self._it = iter(DataLoader(_Slots(args, positions, stats, self._consumed % self.slots),
                                           batch_size=None, num_workers=self.workers, pin_memory=self.pin,
                                           prefetch_factor=ahead))
        inputs = None
        while inputs is None:
            item = next(self._it)
            if isinstance(item, DataError):
                raise DataError(str(item)) from None
            inputs, labels, slot, pos, stats = item
            self._pos[slot], self._stats[slot] = pos, Counter(stats)
        self._consumed += 1
        if self.pin and self.workers == 0:      # with workers, the DataLoader pins them
            inputs, labels = inputs.pin_memory(), labels.pin_memory()
        return inputs, labels

    @property
    def stats(self) -> dict:
        total = Counter()
        for pos, stats in zip(self._pos, self._stats):
            total.update(stats)
            total.update(pos["open"])
        return {**total, "epoch": min(p["epoch"] for p in self._pos)}

    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"source": c.source, "path": c.path, "seq_len": c.seq_len, "packing": c.packing, "seed": c.seed,
                "bos": c.bos, **({"pad_id": c.pad_id} if c.pad_id >= 0 else {}),
                **({"doc_order": c.doc_order} if c.doc_order else {}),
                "shuffle_buffer": c.shuffle_buffer, "vocab_size": self.tokenizer.vocab_size,
                "world_size": self.world_size, "num_workers": self.workers, "batch_size": self.batch_size}

    def state_dict(self) -> dict:
        """Everything needed to continue with the next unseen row (small, JSON-serialisable)."""
        return {"version": STATE_VERSION, "rank": self.rank, "consumed": self._consumed,
                "setup": self._fingerprint(), "positions": [dict(p) for p in self._pos],
                "stats": [dict(s) for s in self._stats]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()` of the same rank, in a run with the same data setup)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state: version {state.get('version')!r} is not {STATE_VERSION}; "
                            f"this checkpoint's data position cannot be restored")
        if state["rank"] != self.rank:
            raise DataError(f"data state: saved by rank {state['rank']}, loaded on rank {self.rank}; "
                            f"give every rank its own state")
        mine = self._fingerprint()
        diff = [f"{k}={state['setup'].get(k)!r} (now {v!r})" for k, v in mine.items() if state["setup"].get(k) != v]
        if diff:
            raise DataError(f"data state: saved with {', '.join(diff)}; resume with the same data setup")
        self._pos = [dict(p) for p in state["positions"]]
        self._stats = [Counter(s) for s in state["stats"]]
        self._consumed = state["consumed"]
        self._it = None


def validation_batches(cfg: DataConfig, tokenizer, batch_size: int, rank: int = 0, world_size: int = 1,
                       split: str = "validation") -> list:
    """This rank's share of the fixed validation slice: `cfg.val_tokens` tokens of the validation split
    after its first `cfg.val_skip_tokens` (shards by name, documents in file order, or in the `val_order` of
    `data.doc_order` when it has one; packed as in training; the slice starts at the first sequence past the
    skipped tokens), rows dealt round-robin to ranks, in batches of `batch_size` (the last one may be
    smaller). `split="all"`: every document of a single file (one held out from training altogether)
    instead of its validation split."""
    shards = split_shards(cfg, split)
    order = read_doc_order(cfg, "validation") if cfg.doc_order and split == "validation" else None
    if order is not None:
        source = _ordered_rows(cfg, tokenizer, ordered_records(shards, order, "validation"))
    else:
        source = read_rows(cfg, tokenizer, shards, 0, 1, _start_pos(), Counter(), VAL_CHUNK_DOCS, shuffle=False,
                           epochs=1)
    rows, skipped, tokens = [], 0, 0
    for inputs, labels in source:
        if tokens >= cfg.val_tokens:
            break
        n = int((labels != IGNORE).sum())
        if skipped < cfg.val_skip_tokens:
            skipped += n
            continue
        rows.append((inputs, labels))
        tokens += n
    if tokens < cfg.val_tokens:
        log.warning("data: the validation split has only %d tokens after the %d skipped, fewer than "
                    "data.val_tokens=%d; evaluating on all of them", tokens, skipped, cfg.val_tokens)
    if not rows:
        raise DataError(f"data.val_skip_tokens={cfg.val_skip_tokens} skips the whole validation split "
                        f"({skipped} tokens); lower it")
    mine = rows[rank::world_size]
    return [_stack(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]


def _stack(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))
