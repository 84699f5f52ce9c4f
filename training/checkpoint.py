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
is recorded before it is made (training/scratch.py), and only recorded names are ever cleaned up. A save
that fails (disk full, permissions) removes its temporary directory and raises CheckpointError: the run stops with
the previous checkpoint intact rather than training on without one. On resume, a checkpoint with
missing files, truncated tensor files or an unreadable state is skipped with a warning (see
`find_resume`), and so is one whose files differ from its manifest.json (each file's CRC-32, written by
rank 0 last, before the rename: training/integrity.py); `--resume auto` never starts fresh over
checkpoints it cannot use. Tests kill runs inside a save through the `on_phase` callback (training/crash.py).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import scratch
from .collectives import barrier
from .crash import is_peer_failure
from common.errors import CheckpointError
from .files import atomic_write_text, fsync_dir
from .health import read_healthy
from .integrity import has_manifest, legacy_warning, verify, write_manifest
from .layout import CHECKPOINTS, LATEST, RUN_CONFIG, TOKENIZER, rank_state_name

TAG_RE = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    """Python, NumPy, torch CPU and (on a GPU) this rank's CUDA device's generator states as JSON-friendly lists.
    Only the current device's: each rank drives one GPU, and reading every device's state would initialise a
    CUDA context on each GPU of the node from every rank."""
    py = random.getstate()
    npy = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories step_N, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def clean_stale(ckpt_root: Path) -> list[str]:
    """Remove the leftovers of interrupted saves and deletions, by the names recorded before they were made
    (training/scratch.py; rank 0 only, before training): a directory of the user's is never touched."""
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
    trash = final.with_name(final.name + ".trash")
    if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
        final.rename(scratch.claim(trash))
    tmp.rename(final)
    fsync_dir(ckpt_root)
    scratch.drop(tmp)
    on_phase("checkpoint_commit", step)
    atomic_write_text(ckpt_root / LATEST, final.name)
    _delete(trash)


def _delete(trash: Path) -> None:
    """Delete a renamed-away checkpoint; its name stays recorded until it is gone (a failure is retried by
    the next run's clean_stale)."""
    shutil.rmtree(trash, ignore_errors=True)
    if not trash.exists():
        scratch.drop(trash)


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names, nor the newest one
    verified healthy: training/health.py)."""
    keep = {read_latest(ckpt_root, strict=False), read_healthy(ckpt_root)}
    for p in step_dirs(ckpt_root)[:-keep_last]:
        if p.name not in keep:
            trash = scratch.claim(p.with_name(p.name + ".trash"))
            p.rename(trash)
            _delete(trash)


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


def broken_archives(tag_dir: Path) -> list[str]:
    """The `.pt` files of a checkpoint that are not complete zip archives (torch.save writes zips; a
    truncated one has lost its central directory at the end)."""
    return [f.name for f in sorted(Path(tag_dir).glob("*.pt")) if not zipfile.is_zipfile(f)]


class OpaqueState:
    """What an allowed non-tensor object of a checkpoint unpickles to when only checking or reading
    weights: an inert stand-in (nothing of DeepSpeed or galore_torch is imported or run)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Every global DeepSpeed 0.19's own checkpoints hold besides tensors and containers (read off real
# checkpoints of ZeRO 0-3, fp32 and bf16, AdamW, Adafactor and GaLore; every resume test checks them, and
# tests/test_train_c4.py::test_two_processes_match_one_process checks ZeRO 1-3 directly).
ALLOWED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address",
                   "galore_torch.galore_projector.GaLoreProjector")


def safe_load(file: Path):
    """torch.load(weights_only=True) with the allow-list mapped to inert stand-ins: loading runs no code."""
    with torch.serialization.safe_globals([(OpaqueState, name) for name in ALLOWED_GLOBALS]):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def check_pickles(tag_dir: Path) -> None:
    """Before DeepSpeed (which unpickles fully) reads a checkpoint: every `.pt` file of `tag_dir` must load
    with `safe_load`, else a one-line CheckpointError names the file and the global it would run."""
    for f in sorted(Path(tag_dir).glob("*.pt")):
        try:
            safe_load(f)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"the global {found.group(1)}" if found else "an object"
            raise CheckpointError(f"{f}: holds {what}, which is not in the allow-list of what DeepSpeed's "
                                  f"checkpoints contain; loading it could run code, so it is refused (pass "
                                  f"--trust-checkpoint only for a checkpoint whose origin you trust)") from None
        except Exception as e:
            raise CheckpointError(f"{f}: cannot be read as a torch checkpoint ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0]}); use another checkpoint") from None


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
        path = Path(resume)
        for root in (path, path / CHECKPOINTS):
            if (root / LATEST).is_file():
                path = root / read_latest(root)
                break
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


# What a checkpoint fixes: resuming with another value is refused before anything starts. The model's
# memory options and velora.fused (compiled or eager codecs, bitwise the same) change nothing that is
# computed; settings not listed here (lr, schedule lengths, eval and
# save cadence, validation size, epochs) may change on resume and are listed in a note.
NOT_FIXED = {"model": ("loss_chunk_size", "recompute_swiglu", "activation_checkpointing"), "velora": ("fused",)}
# data.num_workers is checked by the data state itself, resolved (`auto` is a number of workers there).
FIXED = {"data": ("source", "path", "tokenizer", "seq_len", "packing", "shuffle_buffer", "seed", "add_bos"),
         "optim": ("name", "galore_rank", "galore_update_proj_gap", "galore_proj_type", "galore_targets", "galore_scale"),
         "deepspeed": ("zero_optimization.stage", "bf16.enabled", "fp16.enabled", "train_batch_size",
                       "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}
WHY = {"model": "the weights have another shape or function", "velora": "the codecs' state would not match",
       "data": "the saved data position means nothing in another data setup",
       "optim": "the optimizer state belongs to another optimizer",
       "deepspeed": "DeepSpeed cannot load a checkpoint into another ZeRO stage, precision or batch layout"}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return None if d == {} else d


def check_compatible(step_dir: Path, run_config) -> list[str]:
    """Refuse a checkpoint whose fixed settings (model, VeLoRA, data pipeline, optimizer, ZeRO layout)
    differ from this run's, naming the setting and the saved value; list the other changed settings."""
    saved = json.loads((step_dir / RUN_CONFIG).read_text())
    now = run_config.to_dict()
    keys = {s: [k for k in set(saved.get(s, {})) | set(now[s]) if k not in NOT_FIXED[s]]
            for s in ("model", "velora")}
    keys.update(FIXED)
    for section, names in keys.items():
        diff = sorted(k for k in names if _get(saved.get(section, {}), k) != _get(now[section], k))
        if diff:
            k = diff[0]
            raise CheckpointError(
                f"{step_dir}: the checkpoint's {section} differs from this run's in "
                f"{', '.join(f'{section}.{d}' for d in diff)} ({section}.{k}: checkpoint {_get(saved[section], k)!r}, "
                f"now {_get(now[section], k)!r}); {WHY[section]}: resume with the settings it was written with "
                f"({step_dir / RUN_CONFIG})")
    changed = sorted(f"{s}.{k}" for s in ("model", "data", "optim", "train") for k in set(saved[s]) | set(now[s])
                     if saved[s].get(k) != now[s].get(k) and k not in FIXED.get(s, ()))
    if saved["deepspeed"] != now["deepspeed"]:
        changed.append("deepspeed")
    return [f"note: resuming with changed settings: {', '.join(changed)}"] if changed else []


def same_file(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes."""
    return Path(a).read_bytes() == Path(b).read_bytes()


def load_checkpoint(engine, step_dir: Path, rank: int) -> dict:
    """Load model, optimizer and scheduler into `engine` and return this rank's trainer state."""
    path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{step_dir}: DeepSpeed could not load this checkpoint; resume from an older "
                              f"one with --resume {step_dir.parent}/step_N")
    return json.loads((step_dir / rank_state_name(rank)).read_text())
