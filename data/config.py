"""The data section of a run config."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, check_choice, check_positive, check_range

# DataLoader worker processes per rank that `data.num_workers=auto` gives on a GPU: what llama_60m at 40% MFU
# consumes on one H100, from one core's measured pipeline rate, plus one spare (docs/BENCHMARKS.md, "Data
# pipeline per core"). A constant, not the machine's core count: the data position of a checkpoint depends
# on the number of readers, so the same config resumes on any machine.
AUTO_WORKERS_CUDA = 5


@dataclass
class DataConfig:
    """Where text comes from and how it becomes fixed-length token sequences (see data/)."""

    source: str = "builtin"          # builtin | c4 | local (data.path: a directory of C4 shards or one .json.gz/.jsonl file)
    path: str = ""                   # for source=local
    tokenizer: str = "builtin"       # builtin | t5-base | path to a sentencepiece .model
    seq_len: int = 256
    packing: str = "concat"          # concat (documents joined with EOS) | galore (truncate + pad)
    shuffle_buffer: int = 10000      # documents per shuffled chunk (the unit of shuffling, sharding and resume)
    seed: int = 42
    val_tokens: int = 10_000_000     # the fixed validation slice (GaLore evaluates 10M tokens)
    # where that slice starts: after this many tokens of the validation split, so one split gives disjoint
    # slices (e.g. choose hyper-parameters on the first val_tokens, report on the next ones)
    val_skip_tokens: int = 0
    # DataLoader worker processes per rank: auto = AUTO_WORKERS_CUDA on a GPU, 0 (read in the training process) on CPU
    num_workers: int | str = "auto"
    pin_memory: bool | str = "auto"  # page-locked batches, copied to the GPU without a host sync: auto = on a GPU
    cache_dir: str = ""              # builtin corpus/tokenizer cache; default $VELORA_CACHE or ~/.cache/velora
    max_bad_fraction: float = 0.01   # more malformed lines than this (per shard) is an error
    epochs: int = 0                  # stop after this many passes over the train split; 0 = stream forever
    # BOS at the start of every document: true | false | auto (true for concat, LLaMA's convention; false
    # for galore, faithful to GaLore's T5 pipeline, which has none). BOS is never a training target.
    add_bos: bool | str = "auto"
    pad_id: int = -1                 # the id that fills rows (always masked): -1 = the tokenizer's pad id, else EOS
    # A JSON file that fixes the document order (the official reference's batches.json): `train_order` lists
    # the training documents as 0-based line numbers of the train split (its shards' lines counted in name
    # order), replayed batch after batch in that order; `val_order`, when present, the validation documents.
    # galore packing only (one row per document); the run ends when the order does.
    doc_order: str = ""

    def __post_init__(self):
        check_choice("data.source", self.source, ("builtin", "c4", "local"))
        check_choice("data.packing", self.packing, ("concat", "galore"))
        if self.source == "local" and not self.path:
            raise ConfigError("data.path: required when data.source is 'local' (a directory of C4 shards "
                              "or one .json.gz/.jsonl file)")
        for name in ("val_tokens", "shuffle_buffer"):
            check_positive(f"data.{name}", getattr(self, name))
        check_range("data.seq_len", self.seq_len, 2, what="at least 2", integer=True)
        for name in ("epochs", "val_skip_tokens", "seed"):
            check_range(f"data.{name}", getattr(self, name), 0, integer=True)
        if self.num_workers != "auto":
            check_range("data.num_workers", self.num_workers, 0, what="a number >= 0 or auto", integer=True)
        check_choice("data.pin_memory", self.pin_memory, (True, False, "auto"))
        check_choice("data.add_bos", self.add_bos, (True, False, "auto"))
        if self.cache_dir and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise ConfigError(f"data.cache_dir: {self.cache_dir} is a file, not a directory; point it at a directory "
                              f"(it is created when missing)")
        check_range("data.pad_id", self.pad_id, -1, what="a token id >= 0, or -1 for the tokenizer's own",
                    integer=True)
        if self.doc_order and self.packing != "galore":
            raise ConfigError(f"data.doc_order: replays documents one row each, so it needs data.packing=galore "
                              f"(got {self.packing})")
        if self.doc_order and self.num_workers not in (0, "auto"):
            raise ConfigError("data.doc_order: the fixed order is read in the main process; set data.num_workers=0")
        check_range("data.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0, what="in [0, 1)")

    @property
    def bos(self) -> bool:
        """Whether documents start with BOS (`add_bos` resolved)."""
        return self.packing == "concat" if self.add_bos == "auto" else self.add_bos

    def loader(self, cuda: bool) -> tuple[int, bool]:
        """(DataLoader workers, pin memory) with `auto` resolved for a run on a GPU (`cuda`) or on CPU."""
        if self.pin_memory is True and not cuda:
            raise ConfigError("data.pin_memory=true: page-locked memory is for copies to a GPU and this run has none; "
                            "set data.pin_memory=auto (or false)")
        workers = (0 if self.doc_order else AUTO_WORKERS_CUDA if cuda else 0) if self.num_workers == "auto" \
            else self.num_workers
        return workers, cuda if self.pin_memory == "auto" else self.pin_memory

    @property
    def cache_path(self) -> Path:
        """Where the builtin corpus and tokenizers are cached."""
        return Path(self.cache_dir or os.environ.get("VELORA_CACHE") or Path.home() / ".cache" / "velora")
