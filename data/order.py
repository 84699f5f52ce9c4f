"""`data.doc_order`: a fixed order of documents, read from a JSON file of line numbers (the official
reference's batches.json), so that a run sees exactly the batches another trainer saw."""
from __future__ import annotations

import json
from pathlib import Path

from data.config import DataConfig
from common.errors import DataError

KEYS = {"train": "train_order", "validation": "val_order"}


def read_doc_order(cfg: DataConfig, split: str) -> list[int] | None:
    """The 0-based line numbers `data.doc_order` lists for `split` (None when it lists none for validation)."""
    path, key = Path(cfg.doc_order), KEYS[split]
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"data.doc_order: {path} cannot be read ({e.strerror or e}); point it at a JSON file "
                        f"with a train_order list") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data.doc_order: {path} is not valid JSON ({e}); point it at a JSON file with a "
                        f"train_order list") from None
    order = raw.get(key) if isinstance(raw, dict) else None
    if order is None and split == "validation":
        return None
    if not isinstance(order, list) or not order or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           and i >= 0 for i in order):
        raise DataError(f"data.doc_order: {path} needs '{key}': a non-empty list of 0-based line numbers")
    return order


def ordered_records(shards: list, order: list[int], split: str) -> list:
    """The raw records at `order`'s line numbers, the lines of `shards` counted one after another."""
    wanted, found, n = set(order), {}, 0
    for shard in shards:
        for record in shard.records():
            if n in wanted:
                found[n] = record
            n += 1
    missing = [i for i in order if i not in found]
    if missing:
        raise DataError(f"data.doc_order: line {missing[0]} is beyond the {n} lines of the {split} split; "
                        f"the order belongs to other data (check data.path)")
    return [found[i] for i in order]
