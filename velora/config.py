"""VeLoRAConfig: which projections to compress, and how."""
from __future__ import annotations

from dataclasses import dataclass, field

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {"none": (), "paper": ("v_proj", "down_proj"), "all": PROJECTIONS}
# Projections that read one tensor: compressing only part of a group frees nothing for that input.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# The official script's grouping (sub_token_size 0): a fixed number of sub-tokens per input,
# 64 for attention-width inputs and 86 for the MLP width (M = 8 and 16 on llama_60m).
PAPER_SUB_TOKENS = {"down_proj": 86}
PAPER_SUB_TOKENS_DEFAULT = 64


def parse_init(init: str) -> float | None:
    """Validate an init rule; returns the EMA decay for `ema:<decay>`, else None."""
    if init in ("batch_average_once", "batch_average", "random"):
        return None
    if init.startswith("ema:"):
        try:
            decay = float(init[4:])
        except ValueError:
            decay = -1.0
        if 0.0 < decay < 1.0:
            return decay
    raise ValueError(f"velora.init: expected batch_average_once, batch_average, ema:<decay in (0,1)> "
                     f"or random, got {init!r}")


@dataclass
class VeLoRAConfig:
    """The run config's `velora` section.

    targets: a preset name (`none`, `paper`, `all`) or a list of HF projection names.
    sub_token_size: M, the sub-token length; 0 means the official script's grouping (a fixed number
      of sub-tokens per width: 64 for attention-width inputs, 86 for the MLP width, as on llama_60m).
    sub_token_overrides: per-projection M, e.g. {"down_proj": 32}.
    rank: r unit vectors per sub-token (1 in the paper).
    init: `batch_average_once` | `batch_average` | `ema:<decay>` | `random`.
    coef_dtype: `compute` (the dtype autocast or the weights compute in) or `int8` (per-row scale).
    seed: seeds `random` init.
    """

    targets: str | list = "none"
    sub_token_size: int = 0
    sub_token_overrides: dict = field(default_factory=dict)
    rank: int = 1
    init: str = "batch_average_once"
    coef_dtype: str = "compute"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.targets, str):
            if self.targets not in PRESETS:
                raise ValueError(f"velora.targets: unknown preset {self.targets!r}; "
                                 f"use one of {', '.join(PRESETS)} or a list of {', '.join(PROJECTIONS)}")
        else:
            bad = [t for t in self.targets if t not in PROJECTIONS]
            if bad:
                raise ValueError(f"velora.targets: unknown projection(s) {', '.join(map(str, bad))}; "
                                 f"known: {', '.join(PROJECTIONS)}")
        if self.sub_token_size < 0:
            raise ValueError(f"velora.sub_token_size: must be positive (or 0 for the paper's grouping), "
                             f"got {self.sub_token_size}")
        for name, m in self.sub_token_overrides.items():
            if name not in PROJECTIONS:
                raise ValueError(f"velora.sub_token_overrides: unknown projection {name!r}")
            if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
                raise ValueError(f"velora.sub_token_overrides.{name}: must be a positive int, got {m!r}")
        if self.rank < 1:
            raise ValueError(f"velora.rank: must be >= 1, got {self.rank}")
        if self.coef_dtype not in ("compute", "int8"):
            raise ValueError(f"velora.coef_dtype: expected 'compute' or 'int8', got {self.coef_dtype!r}")
        parse_init(self.init)

    @property
    def target_list(self) -> tuple:
        return PRESETS[self.targets] if isinstance(self.targets, str) else tuple(self.targets)

    @property
    def enabled(self) -> bool:
        return bool(self.target_list)

    def sub_token_for(self, name: str, in_features: int) -> int:
        """M for projection `name` (an HF name) reading `in_features`-wide inputs."""
        if name in self.sub_token_overrides:
            return self.sub_token_overrides[name]
        if self.sub_token_size:
            return self.sub_token_size
        groups = PAPER_SUB_TOKENS.get(name, PAPER_SUB_TOKENS_DEFAULT)
        return -(-in_features // groups)
