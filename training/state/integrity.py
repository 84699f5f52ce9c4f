"""Content manifests: what a checkpoint or export held when it was written, so that a flipped byte, a
truncated or swapped file is caught when it is read, not trained on.

`manifest.json` (written last, atomically, inside the directory before it is renamed into place) lists
every file of the directory with its size and CRC-32. `verify` re-reads every file and compares.

CRC-32 (zlib, standard library) is chosen for speed (docs/BENCHMARKS.md, "Checkpoint integrity"): it
detects every burst error up to 32 bits and any other random corruption with probability 1 - 2^-32. It is
not a cryptographic hash: it does not protect against deliberate tampering (anyone who can change a file
can rewrite the manifest), and a directory whose manifest was deleted reads as one written before
manifests existed (accepted with a warning, see `verify`).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

from .files import atomic_write_text
from .layout import MANIFEST

ALGORITHM = "crc32"
_CHUNK = 8 << 20


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits (read in 8 MiB chunks)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> Path:
    """Hash every file under `directory` and write `directory/manifest.json` atomically (call it after
    every other file is written). Returns the manifest's path."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, ALGORITHM: file_crc32(p)}
             for p in _files(directory)}
    path = directory / MANIFEST
    atomic_write_text(path, json.dumps({"version": 1, "algorithm": ALGORITHM, "files": files}, indent=1) + "\n")
    return path


def verify(directory: Path) -> str | None:
    """Why the files of `directory` differ from its manifest (one phrase that starts with the file's path), or
    None when
    they all match. A directory without a manifest (written before manifests existed) returns None;
    `has_manifest` tells the two apart."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        listed = json.loads(path.read_text())["files"]
        listed = {name: (int(e["bytes"]), str(e[ALGORITHM])) for name, e in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return f"{path}: unreadable ({type(e).__name__}: {e})"
    present = {p.relative_to(directory).as_posix(): p for p in _files(directory)}
    for name, (size, crc) in sorted(listed.items()):
        p = present.get(name)
        if p is None:
            return f"{directory / name}: listed in {MANIFEST} but missing"
        if p.stat().st_size != size:
            return f"{p}: {p.stat().st_size} bytes, {MANIFEST} says {size} (truncated or replaced)"
        if file_crc32(p) != crc:
            return f"{p}: does not match its {ALGORITHM} in {MANIFEST} (its bytes changed after it was written)"
    extra = sorted(set(present) - set(listed))
    if extra:
        return f"{directory / extra[0]}: not listed in {MANIFEST} (added after the directory was written)"
    return None


def has_manifest(directory: Path) -> bool:
    """Whether `directory` was written with a manifest (everything written since manifests exist is)."""
    return (Path(directory) / MANIFEST).is_file()


def legacy_warning(directory: Path) -> str:
    """The warning for a directory written before manifests existed: read, but its contents unverified."""
    return (f"warning: {directory} has no {MANIFEST} (written before checkpoints recorded content hashes); "
            f"its files cannot be verified, reading them as they are")


def check_directory(directory: Path, warn) -> None:
    """Before reading a checkpoint or export: a one-line CheckpointError when a file differs from the
    manifest; `warn(line)` when there is no manifest to check against."""
    from common.errors import CheckpointError
    bad = verify(directory)
    if bad:
        raise CheckpointError(f"{bad}; the checkpoint is corrupt: use another one (e.g. an earlier step_N) or "
                              f"export again")
    if not has_manifest(directory):
        warn(legacy_warning(directory))
