"""Atomic DeepSpeed checkpoints with everything needed to continue a run exactly.

Layout under `<output_dir>/checkpoints/`:
  step_N/              DeepSpeed's files (model, optimizer, LR scheduler; VeLoRA's v buffers are
                       module buffers, so they are in the module state) plus ours:
                       trainer_state_rank{r}.json (step, tokens seen, this rank's data iterator
                       position and RNG states), run_config.json, tokenizer.model
  latest               the tag of the newest complete checkpoint (DeepSpeed's format)
  .scratch             while a save or deletion is under way: the temporary names it made

A save goes to `step_N.tmp/`, every file is fsynced, the directory is renamed to `step_N/`, and only
then is `latest` replaced (write + fsync + rename). A kill at any instant therefore leaves `latest`
naming a complete checkpoint. Older checkpoints beyond `train.keep_last` are renamed away before
they are deleted, so a half-deleted directory never looks like a checkpoint. Each such temporary name
is recorded before it is made (training/state/scratch.py), and only recorded names are ever cleaned up. A save
that fails (disk full, permissions) removes its temporary directory and raises CheckpointError: the run stops with
the previous checkpoint intact rather than training on without one. On resume, a checkpoint with
missing files, truncated tensor files or an unreadable state is skipped with a warning (see
`find_resume`), and so is one whose files differ from its manifest.json (each file's CRC-32, written by
rank 0 last, before the rename: training/state/integrity.py); `--resume auto` never starts fresh over
checkpoints it cannot use (training/state/resume.py). Tests kill runs inside a save through the `on_phase`
callback (training/crash.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from common.errors import CheckpointError
from . import scratch
from ..collectives import barrier
from ..crash import is_peer_failure
from .files import atomic_write_text, fsync_dir
from .health import read_healthy
from .integrity import write_manifest
from .layout import LATEST, RUN_CONFIG, TOKENIZER, rank_state_name
from .tags import read_latest, step_dirs


def clean_stale(ckpt_root: Path) -> list[str]:
    """Remove the leftovers of interrupted saves and deletions, by the names recorded before they were made
    (training/state/scratch.py; rank 0 only, before training): a directory of the user's is never touched."""
    return scratch.clean(ckpt_root) if ckpt_root.is_dir() else []


def _no_phase(name: str, step: int) -> None:
    pass


def save_checkpoint(engine, ckpt_root: Path, step: int, rank_state: dict, *, rank: int, run_config,
                    tokenizer_path: str | None, keep_last: int, on_phase=_no_phase) -> Path:
    """Save step `step` atomically (all ranks call this) and return the final directory. `on_phase(name,
    step)` is called with `checkpoint_write` (files written, not renamed) and `checkpoint_commit` (rank 0:
    renamed, `latest` not yet updated)."""
    tag = f"step_{step}"
    tmp, final = ckpt_root / f"{tag}.tmp", ckpt_root / tag
    try:
        if rank == 0:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            scratch.claim(tmp)
        barrier()
        engine.save_checkpoint(str(ckpt_root), tag=tmp.name, client_state={"step": step}, save_latest=False)
        tmp.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tmp / rank_state_name(rank), json.dumps(rank_state))
        if rank == 0:
            run_config.save(tmp / RUN_CONFIG)
            if tokenizer_path:
                shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        barrier()
        on_phase("checkpoint_write", step)
        if rank == 0:
            write_manifest(tmp)           # last: it covers every rank's files
            _commit(tmp, final, ckpt_root, step, on_phase)
            prune(ckpt_root, keep_last)
        barrier()
    # torch.save reports a failed write (e.g. a full disk) as RuntimeError, Python file calls as OSError
    except (OSError, RuntimeError) as e:
        if is_peer_failure(e):       # a peer died in the save's barrier: the disk is not to blame
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            scratch.drop(tmp)
        why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else
               type(e).__name__)
        previous = read_latest(ckpt_root, strict=False)
        raise CheckpointError(f"saving checkpoint {tag} in {ckpt_root} failed ({why}); the previous checkpoint "
                              f"{previous or '(none)'} is intact; free space or fix permissions, then resume "
                              f"with --resume auto") from e
    return final


def _commit(tmp: Path, final: Path, ckpt_root: Path, step: int, on_phase) -> None:
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            fsync_dir(f)
    fsync_dir(tmp)

    def point_latest() -> None:
        on_phase("checkpoint_commit", step)
        atomic_write_text(ckpt_root / LATEST, final.name)
    # re-saving a step (e.g. after resuming from an older checkpoint) replaces the directory
    scratch.replace_dir(tmp, final, point_latest)


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names, nor the newest one
    verified healthy: training/state/health.py)."""
    keep = {read_latest(ckpt_root, strict=False), read_healthy(ckpt_root)}
    for p in step_dirs(ckpt_root)[:-keep_last]:
        if p.name not in keep:
            scratch.remove_dir(p)
