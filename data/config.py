"""The data section of a run config."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from training.errors import DataError, check_choice


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
    num_workers: int = 0
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
        check_choice("data.source", self.source, ("builtin", "c4", "local"), DataError)
        check_choice("data.packing", self.packing, ("concat", "galore"), DataError)
        if self.source == "local" and not self.path:
            raise DataError("data.path: required when data.source is 'local' (a directory of C4 shards "
                            "or one .json.gz/.jsonl file)")
        for name in ("seq_len", "val_tokens", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise DataError(f"data.{name}: must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise DataError(f"data.seq_len: must be at least 2, got {self.seq_len}")
        for name in ("num_workers", "epochs"):
            if getattr(self, name) < 0:
                raise DataError(f"data.{name}: must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise DataError(f"data.seed: must be >= 0, got {self.seed}")
        if self.cache_dir and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise DataError(f"data.cache_dir: {self.cache_dir} is a file, not a directory; point it at a directory "
                            f"(it is created when missing)")
        if self.add_bos not in (True, False, "auto"):
            raise DataError(f"data.add_bos: expected true, false or auto, got {self.add_bos!r}")
        if not isinstance(self.pad_id, int) or self.pad_id < -1:
            raise DataError(f"data.pad_id: expected a token id >= 0, or -1 for the tokenizer's own, got {self.pad_id!r}")
        if self.doc_order and self.packing != "galore":
            raise DataError(f"data.doc_order: replays documents one row each, so it needs data.packing=galore "
                            f"(got {self.packing})")
        if self.doc_order and self.num_workers:
            raise DataError("data.doc_order: the fixed order is read in the main process; set data.num_workers=0")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise DataError(f"data.max_bad_fraction: expected a value in [0, 1), got {self.max_bad_fraction}")

    @property
    def bos(self) -> bool:
        """Whether documents start with BOS (`add_bos` resolved)."""
        return self.packing == "concat" if self.add_bos == "auto" else self.add_bos

    @property
    def cache_path(self) -> Path:
        """Where the builtin corpus and tokenizers are cached."""
        return Path(self.cache_dir or os.environ.get("VELORA_CACHE") or Path.home() / ".cache" / "velora")
