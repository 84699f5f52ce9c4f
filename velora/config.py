"""VeLoRAConfig: which projections to compress, and with which activation codec."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError, check_choice, check_positive, check_range

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# `all` leaves o_proj out: its input is the attention output, which scaled_dot_product_attention keeps
# for its own backward, so compressing it frees nothing and only adds what the codec stores.
TARGET_PRESETS = {"none": (), "paper": ("v_proj", "down_proj"),
                  "all": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")}
# Projections that read one tensor: compressing only part of a group frees nothing for that input.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# The official script's grouping (sub_token_size 0), the one default M of every codec: a fixed number of
# sub-tokens per input, 64 for attention-width inputs and 86 for the MLP width: the official VeLoRA llama_60m
# run's `--num_groups 64,86` (M = 8 and 16 there; tests/test_velora_config.py pins it). The official 130m
# run uses 64,64; configs/llama_130m.json says so with a down_proj override.
PAPER_SUB_TOKENS = {"down_proj": 86}
PAPER_SUB_TOKENS_DEFAULT = 64
# Codecs that keep r numbers per sub-token of size M, so r <= M.
RANKED_CODECS = ("velora", "rademacher", "gaussian")
# What a compressed input keeps for backward (velora/codecs.py): the paper's sub-token projection
# onto a fixed v; x itself at k bits with stochastic rounding; a random sign / Gaussian vector per
# token and sub-token; principal directions of the whole input plus a random sketch of the rest.
CODECS = ("velora", "sr2", "sr4", "sr8", "rademacher", "gaussian", "pca")
COEF_DTYPES = ("compute", "int8", "float16")
INIT_RULES = ("batch_average_once", "batch_average", "random")
# Named settings (`velora.setting`): targets and codecs in one word. `sr2_all` keeps every input but
# o_proj's at 2 bits with stochastic rounding (unbiased, full-rank weight gradients); `sr2_hybrid` keeps
# down_proj's MLP-wide input as VeLoRA coefficients instead (slightly less memory). What each costs in
# perplexity, with intervals: docs/BENCHMARKS.md, "The redesigned cpu comparison".
SETTINGS = {"sr2_all": {"targets": "all", "codec": "sr2"},
            "sr2_hybrid": {"targets": "all", "codec": "sr2", "codec_overrides": {"down_proj": "velora"}}}


def parse_init(init: str) -> float | None:
    """Validate an init rule; returns the EMA decay for `ema:<decay>`, else None."""
    if init in INIT_RULES:
        return None
    if isinstance(init, str) and init.startswith("ema:"):
        try:
            decay = float(init[4:])
        except ValueError:
            decay = -1.0
        if 0.0 < decay < 1.0:
            return decay
    raise ConfigError(f"velora.init: expected batch_average_once, batch_average, ema:<decay in (0,1)> "
                      f"or random, got {init!r}")


def check_codec(name: str, where: str = "velora.codec") -> str:
    """Validate a codec name (one of CODECS)."""
    if name not in CODECS:
        raise ConfigError(f"{where}: unknown codec {name!r}; use one of {', '.join(CODECS)}")
    return name


def check_coef_dtype(value: str) -> None:
    """Validate `velora.coef_dtype` (one of COEF_DTYPES)."""
    check_choice("velora.coef_dtype", value, COEF_DTYPES)


def check_rank(rank: int, m: int, where: str) -> None:
    """The rule of the sub-token codecs (RANKED_CODECS): 1 <= rank <= M; `where` names the input."""
    check_positive("velora.rank", rank, integer=True)
    if rank > m:
        raise ConfigError(f"velora.rank={rank} exceeds the sub-token size M={m} of {where}; lower velora.rank "
                          f"or raise velora.sub_token_size")


def _check_projection_map(key: str, mapping, check_value) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"velora.{key}: expected an object {{projection: value}}, got {mapping!r}")
    for name, value in mapping.items():
        if name not in PROJECTIONS:
            raise ConfigError(f"velora.{key}: unknown projection {name!r}; known: {', '.join(PROJECTIONS)}")
        check_value(f"velora.{key}.{name}", value)


def check_fused(value, where: str = "velora.fused"):
    """Validate a `velora.fused` value: "auto", true or false (velora/codecs/fused.py)."""
    if value not in ("auto", True, False) or isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ConfigError(f'{where}: expected "auto" (compiled on CUDA, eager on CPU), true or false, got {value!r}')
    return value


@dataclass
class VeLoRAConfig:
    """The run config's `velora` section.

    setting: a name of SETTINGS, which sets targets, codec and codec_overrides in one word ("" = none;
      giving one of those three as well is an error unless it equals the setting's value).
    targets: a preset name (`none`, `paper` = v_proj + down_proj, `all` = every projection but o_proj)
      or a list of HF projection names.
    codec: what a compressed input keeps for backward (one of CODECS); `codec_overrides` sets it per
      projection, e.g. {"down_proj": "velora"} with codec "sr2". Projections that read one tensor
      (q/k/v, gate/up) share one codec: the first member with an override decides for the group.
    sub_token_size: M, the sub-token length of `velora`, `rademacher`, `gaussian` and `pca` (whose
      random residual uses 2M); 0 means the official script's grouping (64 sub-tokens per
      attention-width input, 86 per MLP-width input). `sub_token_overrides`: per-projection M.
    rank: r vectors per sub-token (1 in the paper); `pca` keeps ceil(r * D / (2M)) principal directions.
    init: how `velora` sets v: `batch_average_once` | `batch_average` | `ema:<decay>` | `random`.
    coef_dtype: `compute` (the dtype autocast or the weights compute in), `int8` (per-row scale) or
      `float16` (the official VeLoRA code's arithmetic, its `fp16=True`: v from the float16 mean of the
      first batch, z in float16, and grad_W per sequence in float16 before the batch sum); `velora` only.
    grad_scale: the weight gradient of every compressed projection is multiplied by this (the official
      code's `--velora_scale`; its C4 recipe uses 1.5); `velora` only.
    group_size: elements per scale/offset group of `sr<k>`.
    refresh_every: training forwards between `pca`'s recomputations of its principal directions.
    seed: seeds `random` init and the random codecs (with the layer, the rank and the forward count).
    fused: run the codecs' encode and decode compiled by torch.compile (fused kernels, bitwise equal to
      the eager code on CPU): "auto" = on CUDA only (on a CPU, matmuls dominate the step and compiling
      costs tens of seconds at start-up), true = everywhere, false = never.
    """

    setting: str = ""
    targets: str | list = "none"
    codec: str = "velora"
    codec_overrides: dict = field(default_factory=dict)
    sub_token_size: int = 0
    sub_token_overrides: dict = field(default_factory=dict)
    rank: int = 1
    init: str = "batch_average_once"
    coef_dtype: str = "compute"
    grad_scale: float = 1.0
    group_size: int = 128
    refresh_every: int = 200
    seed: int = 0
    fused: bool | str = "auto"

    def __post_init__(self):
        self._apply_setting()
        if isinstance(self.targets, str):
            if self.targets not in TARGET_PRESETS:
                raise ConfigError(f"velora.targets: unknown preset {self.targets!r}; use one of "
                                  f"{', '.join(TARGET_PRESETS)} or a list of {', '.join(PROJECTIONS)}")
        else:
            bad = [t for t in self.targets if t not in PROJECTIONS]
            if bad:
                raise ConfigError(f"velora.targets: unknown projection(s) {', '.join(map(str, bad))}; "
                                  f"known: {', '.join(PROJECTIONS)}")
        check_codec(self.codec)
        _check_projection_map("codec_overrides", self.codec_overrides, lambda w, v: check_codec(v, w))
        check_range("velora.sub_token_size", self.sub_token_size, 0,
                    what="positive (or 0 for the paper's grouping)", integer=True)
        _check_projection_map("sub_token_overrides", self.sub_token_overrides,
                              lambda w, v: check_positive(w, v, integer=True))
        for key in ("rank", "group_size", "refresh_every"):
            check_positive(f"velora.{key}", getattr(self, key), integer=True)
        check_coef_dtype(self.coef_dtype)
        check_positive("velora.grad_scale", self.grad_scale)
        others = sorted({self.codec_for(t) for t in self.target_list} - {"velora"})
        for key, value, default in (("coef_dtype", self.coef_dtype, "compute"), ("grad_scale", self.grad_scale, 1.0)):
            if value != default and others:
                raise ConfigError(f"velora.{key}={value} applies to the velora codec only, but the targets use "
                                  f"{', '.join(others)}; set velora.{key}={default}")
        self.check_ranks()
        parse_init(self.init)
        check_fused(self.fused)

    def check_ranks(self, widths: dict | None = None) -> None:
        """rank <= M for every target of a RANKED_CODECS codec. Without `widths` ({projection: input width},
        known once the model is) only the targets with an explicit M are checked."""
        for name in self.target_list:
            if self.codec_for(name) not in RANKED_CODECS:
                continue
            if widths is not None:
                check_rank(self.rank, self.sub_token_for(name, widths[name]), f"{name} (width {widths[name]})")
            elif self.sub_token_for(name, 0):      # an explicit M (the paper's grouping needs the width)
                check_rank(self.rank, self.sub_token_for(name, 0), name)

    def _apply_setting(self) -> None:
        if not self.setting:
            return
        if self.setting not in SETTINGS:
            raise ConfigError(f"velora.setting: unknown setting {self.setting!r}; use one of {', '.join(SETTINGS)}")
        defaults = {"targets": "none", "codec": "velora", "codec_overrides": {}}
        for key, value in SETTINGS[self.setting].items():
            given = getattr(self, key)
            if given not in (defaults[key], value):
                raise ConfigError(f"velora.setting={self.setting} sets velora.{key}={value!r}, but velora.{key}="
                                  f"{given!r} is given too; drop one of them")
            setattr(self, key, value)

    @property
    def target_list(self) -> tuple:
        return TARGET_PRESETS[self.targets] if isinstance(self.targets, str) else tuple(self.targets)

    @property
    def enabled(self) -> bool:
        return bool(self.target_list)

    def codec_for(self, name: str) -> str:
        """The codec of projection `name` (an HF name)."""
        return self.codec_overrides.get(name, self.codec)

    def sub_token_for(self, name: str, in_features: int) -> int:
        """M for projection `name` (an HF name) reading `in_features`-wide inputs: its override, else
        `sub_token_size`, else the paper's grouping (PAPER_SUB_TOKENS)."""
        if name in self.sub_token_overrides:
            return self.sub_token_overrides[name]
        if self.sub_token_size:
            return self.sub_token_size
        groups = PAPER_SUB_TOKENS.get(name, PAPER_SUB_TOKENS_DEFAULT)
        return -(-in_features // groups)
