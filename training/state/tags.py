"""Which checkpoint a name or a path designates: the `step_N` directories of a checkpoints directory, the
tag its `latest` file names, and the one resolver of the path forms a user may pass (a step directory, a
checkpoints directory, a run directory)."""
from __future__ import annotations

import re
from pathlib import Path

from common.errors import CheckpointError
from .layout import CHECKPOINTS, LATEST

TAG_RE = re.compile(r"^step_(\d+)$")


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories step_N, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_latest(ckpt_root: Path, strict: bool = True) -> str | None:
    """The tag `ckpt_root/latest` names, or None without one. The tag must name a directory inside
    `ckpt_root` (a plain name, no path): anything else raises CheckpointError (or, with strict=False,
    reads as no tag)."""
    f = Path(ckpt_root) / LATEST
    if not f.is_file():
        return None
    try:
        tag = f.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        tag, why = None, f"unreadable ({e})"
    else:
        why = None if tag and "/" not in tag and "\\" not in tag and tag not in (".", "..") else \
            f"holds {tag[:80]!r}, not the name of a checkpoint directory"
    if why is None and (Path(ckpt_root) / tag).is_dir():
        return tag
    if not strict:
        return None
    raise CheckpointError(f"{f}: {why or f'names checkpoint {tag!r}, which does not exist in {ckpt_root}'}; pass "
                          f"one of its step_N directories instead")


def follow_latest(path) -> Path:
    """The one resolver of the path forms that name a checkpoint (`--resume PATH`, `load_model`): a
    checkpoints directory stands for the tag its `latest` names, a run directory for its `checkpoints/latest`;
    any other path (a step directory, or no checkpoint at all: the caller says why) is returned as it is."""
    path = Path(path)
    for root in (path, path / CHECKPOINTS):
        if (root / LATEST).is_file():
            return root / read_latest(root)
    return path
