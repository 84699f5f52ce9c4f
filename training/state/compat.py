"""Which settings a checkpoint fixes: resuming with another value of one of them is refused before anything
starts; the others may change and are listed in a note."""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import CheckpointError
from .layout import RUN_CONFIG


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
