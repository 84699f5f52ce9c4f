"""Resuming: which checkpoint `--resume auto|PATH` designates (the newest usable one for `auto`; a
checkpoint with missing files, truncated tensor files, an unreadable state or files that differ from its
manifest is skipped with a warning, and `auto` never starts fresh over checkpoints it cannot use), and
loading it into the engine."""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import CheckpointError
from .integrity import has_manifest, legacy_warning, verify
from .layout import LATEST, RUN_CONFIG, rank_state_name
from .pickles import broken_archives
from .tags import follow_latest, read_latest, step_dirs


def problem(step_dir: Path, world_size: int) -> str | None:
    """Why `step_dir` cannot be resumed by `world_size` processes, or None when it looks complete."""
    if not step_dir.is_dir():
        return "does not exist"
    state0 = step_dir / rank_state_name(0)
    if state0.is_file():
        try:
            saved_world = json.loads(state0.read_text())["world_size"]
        except (ValueError, KeyError) as e:
            return f"unreadable {state0.name} ({e})"
        if saved_world != world_size:
            return world_size_advice(step_dir, saved_world, world_size)
    missing = [n for n in [RUN_CONFIG] + [rank_state_name(r) for r in range(world_size)]
               if not (step_dir / n).is_file()]
    if not any(step_dir.glob("*model_states.pt")):
        missing.append("*model_states.pt")
    if missing:
        return f"missing {', '.join(missing)}"
    broken = broken_archives(step_dir)
    if broken:
        return f"truncated or unreadable {', '.join(broken)}"
    for name in [RUN_CONFIG] + [rank_state_name(r) for r in range(world_size)]:
        try:
            json.loads((step_dir / name).read_text())
        except ValueError as e:
            return f"unreadable {name} ({e})"
    bad = verify(step_dir)
    return f"content check failed: {bad}" if bad else None


def world_size_advice(step_dir: Path, saved_world: int, world_size: int) -> str:
    """Why a checkpoint of another world size cannot be resumed, and the two supported ways on."""
    return (f"written by {saved_world} processes, this run has {world_size}; resume with {saved_world} processes, "
            f"or export it (scripts/export_hf.py --checkpoint {step_dir} --out DIR) and start a new run from "
            f"the export with --set train.init_from=DIR")


def find_resume(resume: str, ckpt_root: Path, world_size: int) -> tuple[Path | None, list[str]]:
    """Resolve `--resume auto|PATH` to a checkpoint directory (or None: start fresh) and notes.

    `auto` takes the checkpoint `latest` names, falling back to the newest usable older one (complete,
    matching its manifest) when it is not, and says why. It starts fresh only where there is no
    checkpoint at all: a directory whose checkpoints are all unusable, or were written by another number
    of processes, is refused (CheckpointError), never trained over. PATH may be a step directory, a
    checkpoints directory or a run directory; anything wrong with it is an error.
    """
    notes = []
    if resume != "auto":
        path = follow_latest(resume)
        why = problem(path, world_size)
        if why:
            raise CheckpointError(f"--resume {resume}: {path} is not a usable checkpoint ({why}); "
                                  f"pass a checkpoints/step_N directory or --resume auto")
        return path, notes + ([] if has_manifest(path) else [legacy_warning(path)])
    try:
        latest = read_latest(ckpt_root)
    except CheckpointError as e:
        notes.append(f"warning: ignoring {ckpt_root / LATEST} ({e})")
        latest = None
    candidates = step_dirs(ckpt_root)[::-1]
    if latest:
        candidates = [ckpt_root / latest] + [p for p in candidates if p.name != latest]
    skipped = []
    for path in candidates:
        saved = saved_world_size(path)
        if saved is not None and saved != world_size:
            raise CheckpointError(f"--resume auto: {path} was {world_size_advice(path, saved, world_size)}; "
                                  f"nothing was trained or overwritten")
        why = problem(path, world_size)
        if why is None:
            return path, notes + ([] if has_manifest(path) else [legacy_warning(path)])
        skipped.append(f"{path} ({why})")
        notes.append(f"warning: skipping checkpoint {skipped[-1]}")
    if candidates or (ckpt_root / LATEST).exists():
        newest = f" (newest: {skipped[0]})" if skipped else ""
        raise CheckpointError(f"--resume auto: {ckpt_root} holds checkpoints but none is usable{newest}; nothing was "
                              f"trained or overwritten: resume from a good copy with --resume PATH, or move "
                              f"{ckpt_root} away to start over")
    notes.append(f"--resume auto: no checkpoint in {ckpt_root}; starting fresh")
    return None, notes


def saved_world_size(step_dir: Path) -> int | None:
    """The number of processes that wrote `step_dir` (from rank 0's state), None where unreadable."""
    try:
        return int(json.loads((step_dir / rank_state_name(0)).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(engine, step_dir: Path, rank: int) -> dict:
    """Load model, optimizer and scheduler into `engine` and return this rank's trainer state."""
    path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{step_dir}: DeepSpeed could not load this checkpoint; resume from an older "
                              f"one with --resume {step_dir.parent}/step_N")
    return json.loads((step_dir / rank_state_name(rank)).read_text())
