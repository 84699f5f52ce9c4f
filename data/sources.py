"""Text sources: the train/validation shards of `builtin`, `local` and `c4`, and parsing of records.

Every source is a list of shards; a shard yields raw records (a JSON line as bytes for files, a dict
for the Hub) that `parse_record` turns into a document or counts as bad. Local files are read with
our own gzip/JSON-lines reader rather than `datasets`' json builder: it lets us skip and count a
malformed line, a line that is not UTF-8 or has no `text`, instead of failing the whole stream, and
it lets a resumed run skip whole shards and lines without parsing them.
"""
from __future__ import annotations

import gzip
import json
import os
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

from data.builtin import builtin_corpus_dir, digest, split_of
from data.config import DataConfig
from common.errors import DataError

ALTERNATIVES = ("set data.source=local with data.path=<a directory of c4-train.*.json.gz / "
                "c4-validation.*.json.gz shards>, or data.source=builtin")
MALFORMED = ("bad_json", "bad_utf8", "missing_text")
# Everything the readers skip and count (malformed lines count towards data.max_bad_fraction).
SKIPPED = MALFORMED + ("empty_docs", "blank_lines", "empty_shards")


# Files of documents a local source reads (one JSON object per line, gzip-compressed or not).
DOCUMENT_SUFFIXES = (".json.gz", ".jsonl.gz", ".json", ".jsonl")


class LocalShard:
    """One C4-format file: JSON lines, gzip-compressed when the name ends in .gz.

    `split` (for a single file that holds both splits): keep only the lines of that split, decided per
    document by the SHA-1 of its line (data.builtin.split_of), so the held-out documents are never
    trained on, whatever the order of the file."""

    def __init__(self, path: Path, split: str | None = None):
        self.path, self.split = Path(path), split
        self.name = self.path.name + (f" ({split} split)" if split else "")
        self._count = None

    def records(self):
        """Raw lines (bytes), blank lines included, so line numbers are stable."""
        opener = gzip.open if self.path.suffix == ".gz" else open
        try:
            with opener(self.path, "rb") as f:
                if self.split is None:
                    yield from f
                else:
                    yield from (line for line in f if split_of(digest(line.strip())) == self.split)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{self.path}: unreadable or truncated ({e}); re-download or remove this shard") from None

    def count(self) -> int:
        """Number of lines (cached: chunk-level sharding needs it every epoch)."""
        if self._count is None:
            self._count = sum(1 for _ in self.records())
        return self._count


class HubShard:
    """One data file of the Hub dataset allenai/c4, streamed by `datasets`."""

    def __init__(self, dataset, index: int):
        self.dataset, self.index = dataset, index
        self.name = f"allenai/c4 shard {index}"

    def records(self):
        yield from self.dataset.shard(num_shards=self.dataset.n_shards, index=self.index)

    count = None  # unknown without downloading the shard


def parse_record(record, stats: Counter) -> str | None:
    """The document text of a record, or None (and a count in `stats`) when it must be skipped."""
    if isinstance(record, bytes):
        if not record.strip():
            stats["blank_lines"] += 1
            return None
        try:
            line = record.decode("utf-8")
        except UnicodeDecodeError:
            stats["bad_utf8"] += 1
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats["bad_json"] += 1
            return None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        stats["missing_text"] += 1
        return None
    if not text.strip():
        stats["empty_docs"] += 1
        return None
    return text


def check_bad_fraction(stats: Counter, where: str, limit: float) -> None:
    """One-line DataError when more than `limit` of the records read from `where` were malformed."""
    bad = sum(stats[k] for k in MALFORMED)
    seen = bad + stats["docs"] + stats["empty_docs"]
    if seen and bad > limit * seen:
        detail = ", ".join(f"{stats[k]} {k}" for k in MALFORMED if stats[k])
        raise DataError(f"{where}: {bad} of {seen} lines are malformed ({detail}), more than "
                        f"data.max_bad_fraction={limit}; fix or remove the file, or raise data.max_bad_fraction")


def _local_dir_shards(directory: Path, split: str) -> list[LocalShard]:
    files = sorted(p for p in directory.glob(f"c4-{split}.*") if p.name.endswith(DOCUMENT_SUFFIXES))
    if not files:
        raise DataError(f"data.path: no c4-{split}.*.json.gz shards in {directory}; point data.path at a "
                        f"directory of C4 shards or at one .json.gz/.jsonl file, or use data.source=builtin")
    return [LocalShard(p) for p in files]


def hub_offline_reason() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode is set ({var}=1)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/api/datasets/allenai/c4", method="HEAD"),
                               timeout=5).close()
    except Exception as e:  # any failure to reach the Hub means the same to the user
        return f"the Hub at {endpoint} is unreachable ({type(e).__name__})"
    return None


def _hub_shards(split: str) -> list[HubShard]:
    reason = hub_offline_reason()
    if reason:
        raise DataError(f"data.source=c4: {reason}; {ALTERNATIVES}")
    import datasets
    try:
        ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    except Exception as e:
        raise DataError(f"data.source=c4: cannot open allenai/c4 ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"{ALTERNATIVES}") from None
    return [HubShard(ds, i) for i in range(ds.n_shards)]


def split_shards(cfg: DataConfig, split: str) -> list:
    """The shards of `split` ("train" or "validation"), sorted by name; a single file holds both, split by
    document (1 in data.builtin.VALIDATION_EVERY held out). `split="all"`: every document of a single file
    (data.source=local), for text held out from training altogether."""
    if split not in ("train", "validation", "all"):
        raise ValueError(split)
    if split == "all":
        if cfg.source != "local" or not Path(cfg.path).is_file():
            raise DataError(f"the whole-file split needs data.source=local and data.path a file of documents, "
                            f"got source={cfg.source} path={cfg.path!r}; point it at one .json.gz/.jsonl file")
        return [LocalShard(Path(cfg.path))]
    if cfg.source == "builtin":
        return _local_dir_shards(builtin_corpus_dir(cfg.cache_path), split)
    if cfg.source == "c4":
        return _hub_shards(split)
    path = Path(cfg.path)
    if path.is_dir():
        return _local_dir_shards(path, split)
    if path.is_file():
        if not path.name.endswith(DOCUMENT_SUFFIXES):
            raise DataError(f"data.path: {path} is not a file of documents ({', '.join(DOCUMENT_SUFFIXES)}); "
                            f"point it at one, or at a directory of C4 shards")
        return [LocalShard(path, split)]
    raise DataError(f"data.path: {path} does not exist; point it at a directory of C4 shards "
                    f"(c4-train.*.json.gz) or a .json.gz/.jsonl file, or use data.source=builtin")
