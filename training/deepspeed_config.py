"""The `deepspeed` section, checked by DeepSpeed's own config classes before any process group starts.

DeepSpeed validates its nested sections (zero_optimization, ...) with pydantic models that forbid extra
keys, but reads its top-level keys with defaults and ignores the ones it does not know, so
`zero_optimisation` would silently train without ZeRO. We hand DeepSpeedConfig a dict that records which
keys DeepSpeed looks up: a key it never looked at is not a DeepSpeed setting.
"""
from __future__ import annotations

import difflib

from common.errors import ConfigError


class _Tracking(dict):
    """A dict that remembers every key read from it (DeepSpeedConfig copies its input with copy.copy)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.read.add(k)
        return super().__contains__(k)

    def pop(self, k, *default):
        self.read.add(k)
        return super().pop(k, *default)

    def __copy__(self):
        return self


def _first_line(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):                        # pydantic: "Model.field: message (got value)"
        err = errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        return f"{getattr(e, 'title', '')}.{loc}: {err.get('msg')} (got {err.get('input')!r})"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def check_deepspeed_section(ds: dict, micro_batch: int, accumulation: int) -> None:
    """Raise ConfigError naming the key when DeepSpeed would refuse, or silently ignore, part of `ds`.

    `micro_batch` and `accumulation` are the resolved values (DeepSpeed checks the batch triple against
    the world size, which is 1 here: the launcher's world size was checked by resolve_batch)."""
    for key in ("bf16", "fp16"):
        section = ds.get(key, {})
        if not isinstance(section, dict) or not isinstance(section.get("enabled", False), bool):
            raise ConfigError(f"deepspeed.{key}: expected an object with a true/false `enabled`, got {section!r}")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"deepspeed.gradient_clipping: expected a number >= 0 (0 = off), got {clip!r}")
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    tracked = _Tracking({**ds, "train_batch_size": micro_batch * accumulation,
                         "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation})
    try:
        DeepSpeedConfig(tracked)
    except Exception as e:          # pydantic's ValidationError, DeepSpeed's own asserts and type errors
        raise ConfigError(f"deepspeed: DeepSpeed {deepspeed.__version__} refuses this section: "
                          f"{_first_line(e)}") from None
    unknown = sorted(set(ds) - tracked.read)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, tracked.read, 1)) else k
                 for k in unknown]
        raise ConfigError(f"deepspeed: {', '.join(hints)}: not a setting DeepSpeed {deepspeed.__version__} reads; "
                          f"fix or remove it")
