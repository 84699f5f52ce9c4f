"""Load a trained model from an export or a DeepSpeed checkpoint, on CPU, without the launcher.

`load_model(path)` accepts, in order of preference:
  - an exported directory (`final/`: `model.safetensors` + `run_config.json` + `tokenizer.model`):
    safetensors, so nothing in it can run code — the preferred form;
  - a run's output directory: its `final/` when present, else `checkpoints/latest`;
  - a `checkpoints/` directory: the tag its `latest` file names;
  - a DeepSpeed tag directory (`checkpoints/step_N/`) of any ZeRO stage and world size.
DeepSpeed checkpoints are pickles: ZeRO 0's model file is read with `torch.load(weights_only=True)`;
ZeRO 1-3 are consolidated by DeepSpeed's own zero_to_fp32 (which unpickles fully), so point it only
at runs you trust; a note on stderr says when a DeepSpeed directory is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from pathlib import Path


from model import LlamaForCausalLM
from training.config import RunConfig, load_config
from common.errors import CheckpointError, ConfigError
from .export import plain_state_dict
from training.state import (CHECKPOINTS, FINAL, RUN_CONFIG, TOKENIZER, WEIGHTS, ZERO0_MODEL_FILE, RunDir,
                            broken_archives, check_directory, check_finite, check_pickles, follow_latest, safe_load)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CheckpointSource:
    """Where `load_model` reads from: `kind` is `safetensors` or `deepspeed`; `dir` holds the weights,
    `run_config.json` and `tokenizer.model` (or `config_file` names the run config elsewhere)."""

    kind: str
    dir: Path
    config_file: Path
    tokenizer_file: Path


def resolve_checkpoint(path) -> CheckpointSource:
    """Find the weights, run config and tokenizer that `path` designates (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path}: is a file; pass the directory that holds it (an exported final/, a "
                              f"run output directory or a DeepSpeed checkpoint directory)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass an exported final/ directory, a run "
                              f"output directory, or a DeepSpeed checkpoint directory")
    if (path / WEIGHTS).is_file():
        return CheckpointSource("safetensors", path, path / RUN_CONFIG, path / TOKENIZER)
    if (path / FINAL / WEIGHTS).is_file():
        return resolve_checkpoint(path / FINAL)
    tag = follow_latest(path)
    if tag.parent == path / CHECKPOINTS:
        log.warning("note: %s has no final/ export (safetensors); reading the DeepSpeed checkpoint "
                    "named by checkpoints/latest", path)
    if list(tag.glob("*model_states.pt")):
        config = tag / RUN_CONFIG
        if not config.is_file():  # a tag directory inside a run: fall back to the run's own config
            config = RunDir(tag.parent.parent).saved_run_config()
        return CheckpointSource("deepspeed", tag, config, tag / TOKENIZER)
    raise CheckpointError(f"{tag}: not a checkpoint (no model.safetensors, final/, checkpoints/latest, "
                          f"latest or *model_states.pt); pass an exported final/, a run output directory "
                          f"or a DeepSpeed checkpoint directory")


def read_safetensors(file: Path) -> dict:
    """The tensors of a safetensors file; a one-line CheckpointError when it cannot be read."""
    from safetensors.torch import load_file
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({str(e).splitlines()[0]}); "
                              f"it may be truncated: export it again") from None


def _check_archives(tag_dir: Path) -> None:
    # Checking first names the bad file instead of failing somewhere inside DeepSpeed.
    for name in broken_archives(tag_dir):
        raise CheckpointError(f"{tag_dir / name}: truncated or not a torch checkpoint file; use another checkpoint "
                              f"(e.g. an earlier step_N)")


def deepspeed_state_dict(tag_dir, trust: bool = False) -> dict:
    """The full-precision weights (and buffers) of one DeepSpeed checkpoint directory, consolidated on
    CPU: ZeRO 1-3 through DeepSpeed's zero_to_fp32 (fp32 master weights), ZeRO 0 from the module.
    DeepSpeed unpickles fully, so its files are checked first (`training.state.check_pickles`) unless
    `trust` is set."""
    tag_dir = Path(tag_dir)
    _check_archives(tag_dir)
    if not trust:
        check_pickles(tag_dir)
    if list(tag_dir.glob("*_optim_states.pt")):  # ZeRO 1-3: weights live partitioned in the optimizer files
        quiet = io.StringIO()  # DeepSpeed prints progress (and an accelerator note on import) to stdout
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as e:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not consolidate this checkpoint "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    file = tag_dir / ZERO0_MODEL_FILE
    if not file.is_file():
        raise CheckpointError(f"{tag_dir}: has no {ZERO0_MODEL_FILE} and no *_optim_states.pt; "
                              f"not a complete DeepSpeed checkpoint")
    try:
        # ZeRO 0 stores the optimizer state in the same file (GaLore's holds projector objects): the
        # allow-listed objects become inert stand-ins; only "module" is used.
        states = safe_load(file)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot be read with torch.load(weights_only=True) "
                              f"({str(e).splitlines()[0]})") from None
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise CheckpointError(f"{file}: has no 'module' state dict; not a DeepSpeed model states file")
    # ZeRO 0 keeps the module's own weights: bf16 runs store bf16 here (their fp32 master copy is not
    # named in the file), so the model is rebuilt from those, upcast to fp32.
    return states["module"]


def _read_run_config(file: Path) -> RunConfig:
    if not file.is_file():
        raise CheckpointError(f"{file}: run config not found next to the checkpoint; the checkpoint "
                              f"directory is incomplete")
    try:
        return load_config(file)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_tokenizer_file(file: Path, run_config: RunConfig):
    """The tokenizer saved with a checkpoint, as a `data` Tokenizer (what validation_batches takes)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: tokenizer not found next to the checkpoint; the checkpoint "
                              f"directory is incomplete")
    from data import load_tokenizer
    data_cfg = dataclasses.replace(run_config.data, tokenizer=str(file))
    return load_tokenizer(data_cfg, run_config.model.vocab_size)


def load_model(path, device="cpu", trust: bool = False, allow_nonfinite: bool = False):
    """Load a trained model for evaluation or further work: returns `(model, run_config, tokenizer)`.

    `path`: an exported `final/` (preferred: safetensors), a run output directory, its
    `checkpoints/` directory or one DeepSpeed `step_N/` directory (any ZeRO stage, any world size;
    consolidated on CPU). The model is a plain fp32 `LlamaForCausalLM` in eval mode on `device`;
    VeLoRA is not applied (for further VeLoRA training, `velora.apply_velora(model,
    run_config.velora)`; to continue a run exactly, resume it with train_c4.py instead).
    The tokenizer is the `data` Tokenizer saved with the checkpoint (its `.model_path` is the file).
    Bad input raises `CheckpointError` with a one-line message naming the file. A DeepSpeed checkpoint
    holding anything outside the allow-list of what DeepSpeed writes is refused unless `trust` is set.
    Every file is first checked against the directory's manifest (training/state/integrity.py; a directory
    written before manifests existed is read with a warning), and weights holding inf or NaN are refused
    unless `allow_nonfinite`.
    """
    return load_source(resolve_checkpoint(path), device, trust, allow_nonfinite)


def load_source(src: CheckpointSource, device="cpu", trust: bool = False, allow_nonfinite: bool = False):
    """`load_model` for a source `resolve_checkpoint` already found (scripts report where it is)."""
    check_directory(src.dir, log.warning)
    run_config = _read_run_config(src.config_file)
    if src.kind == "safetensors":
        weights_file = src.dir / WEIGHTS
        state = read_safetensors(weights_file)
    else:
        weights_file = src.dir
        state = deepspeed_state_dict(src.dir, trust)
    state = plain_state_dict(state, run_config.model, str(weights_file))
    if not allow_nonfinite:
        check_finite(state, str(weights_file))
    tokenizer = load_tokenizer_file(src.tokenizer_file, run_config)
    model = LlamaForCausalLM(run_config.model)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval(), run_config, tokenizer
