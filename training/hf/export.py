"""Export a trained model as a plain LLaMA that `transformers` and lm-evaluation-harness load as is.

`final/` holds `model.safetensors` (plain LLaMA names, VeLoRA buffers left out: VeLoRA changes what
backward stores, never the function, so the exported model is an ordinary LLaMA; the header's metadata
names the step, tokens seen, the run config's digest and the project version), the Hugging Face files
(training/hf/files.py: config.json, generation_config.json, tokenizer.json, tokenizer_config.json),
`tokenizer.model` and `run_config.json` (the resolved run config, so `training.hf.load_model`
rebuilds the model exactly). Files are readable by all (the umask permitting).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import LlamaConfig, LlamaForCausalLM
from training.collectives import rank
from common.errors import CheckpointError
from .files import GENERATION_CONFIG, HF_TOKENIZER_FILES, write_hf_files
from training.state import (HF_CONFIG, MANIFEST, RUN_CONFIG, TOKENIZER, WEIGHTS, FileLock, check_finite, fsync_dir,
                            make_dirs, remove_empty_dirs, replace_dir, trash_of,
                            write_manifest)
from velora import strip_state_dict


def expected_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a plain LlamaForCausalLM of this config saves."""
    with torch.device("meta"):
        return {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}


def plain_state_dict(state_dict: Mapping[str, torch.Tensor], config: LlamaConfig, where: str) -> dict:
    """The tensors of a plain LlamaForCausalLM taken from `state_dict`, VeLoRA buffers dropped.

    Missing names, other unexpected names and wrong shapes raise a one-line CheckpointError that
    names `where` (the file or directory the tensors came from).
    """
    shapes = expected_shapes(config)
    state_dict = strip_state_dict(state_dict)
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(s)}" for k, s in shapes.items()
             if k in state_dict and state_dict[k].shape != s]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) (e.g. {wrong[0]})")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the model config "
                              f"({'; '.join(problems)}); check that the config belongs to these weights")
    return {k: state_dict[k] for k in shapes}


def _gathered_state_dict(model: torch.nn.Module) -> dict:
    """The module's full state dict, gathering ZeRO-3-partitioned parameters (a collective call)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


EXPORT_FILES = (WEIGHTS, HF_CONFIG, TOKENIZER, RUN_CONFIG, GENERATION_CONFIG, MANIFEST, *HF_TOKENIZER_FILES)


def is_export(path: Path) -> bool:
    """Whether `path` is a directory written by `save_final` (it holds nothing else)."""
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and {p.name for p in path.iterdir()} <= set(EXPORT_FILES)


def check_export_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an earlier export, and over that only with `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (overwrite and is_export(out_dir)):
        raise CheckpointError(f"{out_dir}: already exists and " + (
            "holds an export; pass --overwrite to replace it, or choose another directory" if is_export(out_dir)
            else "is not an export written by this project; refusing to replace it, choose another directory"))


def save_final(model, run_config, tokenizer_path, out_dir, dtype: torch.dtype = torch.float32,
               overwrite: bool = False, progress: dict | None = None, allow_nonfinite: bool = False) -> Path:
    """Write `out_dir` (normally `<output_dir>/final`) atomically: a temporary directory renamed
    into place, so a crash never leaves a half-written export, and a failed write (a full disk) removes
    what it made (the message lists anything it could not remove).

    `model` is the plain module (`engine.module` for a DeepSpeed engine) or a state dict (e.g. the
    fp32 weights consolidated from a checkpoint). Under torch.distributed call it on every rank:
    ZeRO-3 parameters are gathered collectively, and only rank 0 writes. `progress` (step, tokens seen)
    goes into the safetensors header with the run config's digest and the project version. An existing `out_dir` is
    replaced only when it is an export and `overwrite` is set; anything else is refused before any
    work. Exports to one `out_dir` are serialised by a lock (`.<name>.lock` beside it): a second one
    while the first writes is refused, and one that finds the first's result checks it again under the
    lock (so it replaces it only with `overwrite`).
    Weights holding inf or NaN are refused unless `allow_nonfinite`. `manifest.json` (the files'
    content hashes, training/state/integrity.py) is written last. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    check_export_target(out_dir, overwrite)
    sd = model if isinstance(model, Mapping) else _gathered_state_dict(model)
    if rank() != 0:
        return out_dir
    tensors = plain_state_dict(sd, run_config.model, "model being exported")
    if not allow_nonfinite:
        check_finite(tensors, f"the model being exported to {out_dir}")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    tmp, old = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}"), trash_of(out_dir)
    made = make_dirs(out_dir.parent)
    try:
        with export_lock(out_dir):
            check_export_target(out_dir, overwrite)      # again: another export may have finished meanwhile
            tmp.mkdir()
            _write_export(tmp, tensors, run_config, tokenizer_path, dtype, progress or {})
            undeleted = replace_dir(tmp, out_dir)
    except Exception as e:    # OSError from Python, SafetensorError from the Rust writer (e.g. a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_dirs(made)
        if isinstance(e, CheckpointError):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
        left = [str(p) for p in (tmp, old, *made) if os.path.lexists(p)]
        kept = ("nothing was left behind" if not left else
                f"left behind (remove by hand): {', '.join(left)}" + (f" (the earlier export is {old})"
                                                                      if old.exists() else ""))
        raise CheckpointError(f"writing the export {out_dir} failed ({why}); {kept}; free space or fix "
                              f"permissions, then export again (scripts/export_hf.py)") from None
    if undeleted is not None:
        print(f"warning: exported {out_dir}, but could not delete the export it replaced, now {undeleted}; "
              f"delete it", file=sys.stderr)
    return out_dir


def export_lock(out_dir: Path) -> FileLock:
    """The lock every export to `out_dir` holds while it writes (a file beside `out_dir`, removed after)."""
    def refuse(holder: str) -> CheckpointError:
        return CheckpointError(f"{out_dir}: another export is writing it now ({holder}); wait for it to end, then "
                               f"export again (with --overwrite to replace its result), or choose another --out")
    return FileLock(out_dir.with_name(f".{out_dir.name}.lock"), refuse)


def export_metadata(run_config, progress: dict) -> dict:
    """The safetensors header's metadata (strings only): where the weights come from."""
    import common
    digest = hashlib.sha256(json.dumps(run_config.to_dict(), sort_keys=True).encode()).hexdigest()
    return {"format": "pt", "project": "velora-pretrain", "project_version": common.__version__,
            "run_config_sha256": digest, **{k: str(v) for k, v in progress.items()}}


def _write_export(tmp: Path, tensors: dict, run_config, tokenizer_path, dtype: torch.dtype, progress: dict) -> None:
    save_file(tensors, tmp / WEIGHTS, metadata=export_metadata(run_config, progress))
    write_hf_files(tmp, run_config.model, Path(tokenizer_path), run_config.data.bos, str(dtype).removeprefix("torch."))
    run_config.save(tmp / RUN_CONFIG)
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)        # safetensors writes 0600: colleagues must be able to read
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    write_manifest(tmp)
    fsync_dir(tmp)
