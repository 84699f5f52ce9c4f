"""Run configs: one JSON with sections model/velora/data/optim/train/deepspeed, typed and validated.

Every error is a `ConfigError` whose message is one line naming the file, the key and what was
expected, so `train_c4.py` can print it and exit without a traceback.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from data.config import DataConfig
from model import LlamaConfig
from velora.config import VeLoRAConfig

from common.errors import ConfigError, check_choice, check_positive, check_range, is_number


OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "galore_adamw", "galore_adafactor")


@dataclass
class OptimConfig:
    """Optimizer and LR schedule. GaLore's knobs apply to galore_* optimizers only."""

    name: str = "adamw"              # adamw | adamw8bit | adafactor | galore_adamw | galore_adafactor
    lr: float = 0.01
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"        # cosine (linear warmup, cosine to min_lr_ratio) | constant
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    galore_rank: int = 128
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    galore_proj_type: str = "std"
    galore_targets: list = field(default_factory=lambda: ["attn", "mlp"])
    # adamw / adafactor: lr factor of the 2-D weights of galore_targets modules (attention, MLP). GaLore's
    # recipe gives those weights galore_scale x lr and everything else lr; 0.25 here is that split
    # without the projection (the control that tells GaLore's projection from its lr split).
    matrix_lr_scale: float = 1.0

    def __post_init__(self):
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_choice("optim.scheduler", self.scheduler, ("cosine", "constant"))
        check_choice("optim.galore_proj_type", self.galore_proj_type, GALORE_PROJ_TYPES)
        check_positive("optim.lr", self.lr)
        check_range("optim.warmup_ratio", self.warmup_ratio, 0.0, 1.0, "in [0, 1)")
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0 + 1e-12, "in [0, 1]")
        check_range("optim.weight_decay", self.weight_decay, 0)
        check_range("optim.eps", self.eps, 0)
        if len(self.betas) != 2 or not all(is_number(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {self.betas}")
        for key in ("galore_rank", "galore_update_proj_gap", "galore_scale", "matrix_lr_scale"):
            check_positive(f"optim.{key}", getattr(self, key))
        if self.name.startswith("galore_") and self.matrix_lr_scale != 1.0:
            raise ConfigError(f"optim.matrix_lr_scale={self.matrix_lr_scale} applies to adamw and adafactor; "
                              f"{self.name} scales the projected matrices with optim.galore_scale")
        if not self.galore_targets or not all(isinstance(t, str) and t for t in self.galore_targets):
            raise ConfigError(f"optim.galore_targets: expected a non-empty list of module-name fragments, got "
                              f"{self.galore_targets!r}")


@dataclass
class TrainConfig:
    """The loop: how long, where outputs go, and how often to log, evaluate and checkpoint."""

    max_steps: int = 1000
    output_dir: str = "runs/default"
    eval_every: int = 1000
    save_every: int = 1000
    log_every: int = 10
    keep_last: int = 3
    seed: int = 42
    eval_batch_size: int = 0         # 0: the micro-batch size
    # Seconds a collective (or the start-up rendezvous) waits for its peers before every rank stops: a rank
    # that died or hangs ends the run within this. It must exceed the longest phase in which one rank works
    # while the others wait: rank 0 building the built-in tokenizer and corpus (first run only, then cached)
    # and committing a checkpoint (fsync, rename, prune). 5 min covers both at llama_1b on a local disk and
    # stays far below torch's defaults (30 min gloo, 10 min NCCL); raise it for slow network filesystems.
    collective_timeout_s: float = 300.0
    # Start from these weights instead of seeded random ones: a safetensors file with plain LLaMA names, or a
    # directory holding model.safetensors (an exported final/). A resumed run takes its checkpoint's instead.
    init_from: str = ""

    def __post_init__(self):
        for name in ("max_steps", "eval_every", "save_every", "log_every", "keep_last", "collective_timeout_s"):
            check_positive(f"train.{name}", getattr(self, name))
        check_range("train.seed", self.seed, 0)
        check_range("train.eval_batch_size", self.eval_batch_size, 0, what=">= 0 (0: the micro-batch size)")
        if not self.output_dir:
            raise ConfigError("train.output_dir: must not be empty")


@dataclass
class RunConfig:
    model: LlamaConfig
    velora: VeLoRAConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    deepspeed: dict
    source: str = ""                 # the file it was loaded from (for messages)

    @property
    def bf16(self) -> bool:
        """Whether DeepSpeed runs in bf16 (`deepspeed.bf16.enabled`)."""
        return bool(self.deepspeed.get("bf16", {}).get("enabled"))

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    def validate(self) -> None:
        """Checks that span sections: combinations that would only fail deep inside DeepSpeed, the
        optimizer or the model."""
        if self.data.seq_len > self.model.max_sequence_length:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_sequence_length="
                              f"{self.model.max_sequence_length}; lower data.seq_len or raise the model's")
        self.velora.check_ranks({t: self.model.intermediate_size if t == "down_proj" else self.model.hidden_size
                                 for t in self.velora.target_list})
        ds, name = self.deepspeed, self.optim.name
        if name != "adamw" and self.zero_stage >= 1 and ds["zero_optimization"].get("elastic_checkpoint"):
            raise ConfigError(f"deepspeed.zero_optimization.elastic_checkpoint=true would save none of {name}'s state "
                              f"under ZeRO {self.zero_stage} (it keeps only tensors of the flat partition's shape); "
                              f"remove it")
        if "optimizer" in ds and name != "adamw":
            raise ConfigError(f"deepspeed.optimizer is set, so DeepSpeed builds its own optimizer, but optim.name="
                              f"{name}; remove deepspeed.optimizer or use optim.name=adamw")
        if "scheduler" in ds:
            raise ConfigError("deepspeed.scheduler: the LR schedule comes from optim.scheduler "
                              "(cosine | constant); remove deepspeed.scheduler")

    def to_dict(self) -> dict:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in ("model", "velora", "data", "optim", "train")}
        d["deepspeed"] = copy.deepcopy(self.deepspeed)
        return d

    def save(self, path: str | Path) -> None:
        """Write the resolved config (after overrides) as JSON, atomically."""
        from .state import atomic_write_text   # here: training.state imports torch, config errors come before it
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


SECTIONS = {"model": LlamaConfig, "velora": VeLoRAConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "deepspeed": dict}


GALORE_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")   # galore_torch's GaLoreProjector


def _no_duplicates(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice is an error (json would silently keep the last)."""
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ConfigError(f"key {k!r} appears twice in one object; keep one")
        seen[k] = v
    return seen


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is not None and typing.get_args(hint):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _build_section(name: str, cls, raw, where: str):
    if cls is dict:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: section '{name}' must be a JSON object")
        return copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section '{name}' must be a JSON object, got {type(raw).__name__}")
    try:
        if cls is LlamaConfig:       # HF's keys: its own from_dict knows the informational ones and aliases
            return LlamaConfig.from_dict(raw)
        return cls(**_typed_values(name, cls, raw))
    except ConfigError as e:        # the section's own message, with the file it came from
        raise ConfigError(f"{where}: {e}") from None


def _typed_values(name: str, cls, raw: dict) -> dict:
    """The keys of `raw`, checked against `cls`'s fields and type hints (ints given for floats become floats)."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"known: {', '.join(sorted(hints))}")
    values = {}
    for key, value in raw.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{name}.{key}: expected {_type_name(hints[key])}, got {value!r}")
        values[key] = float(value) if hints[key] is float else value
    return values


def parse_override(text: str):
    """`section.key[.sub]=value` -> (path list, value). Values parse as JSON where they can
    (ints, floats, true/false, lists), `[a,b]` as a list of strings, anything else as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.max_steps=200")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if any(not p for p in path):
        raise ConfigError(f"--set {text!r}: empty name in {key!r}; expected section.key=value")
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except ConfigError as e:
        raise ConfigError(f"--set {text!r}: {e}") from None
    except json.JSONDecodeError:
        if raw.startswith("[") and raw.endswith("]"):
            value = [_scalar(v.strip()) for v in raw[1:-1].split(",") if v.strip()]
        else:
            value = raw
    return path, value


def _scalar(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw config dict (before validation); returns a new dict."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section {path[0]!r}; sections: {', '.join(SECTIONS)}")
        if path[0] != "deepspeed" and len(path) != 2:
            raise ConfigError(f"--set {text!r}: expected {path[0]}.key=value (one level below the section)")
        node = raw.setdefault(path[0], {})
        for p in path[1:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {p!r} is not an object in the config")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load a run config (or a bare GaLore model JSON, taken as the `model` section), apply
    `--set` overrides, and validate every section."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found (the configs/ directory has the shipped ones)")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}); save the config as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object with sections {', '.join(SECTIONS)}")
    if "hidden_size" in raw:  # a bare GaLore/HF model config
        raw = {"model": raw}
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    return config_from_dict(apply_overrides(raw, list(overrides)), where)


def config_from_dict(raw: dict, where: str) -> RunConfig:
    """A validated RunConfig from a dict of sections (`where` names its origin in messages)."""
    built = {name: _build_section(name, cls, raw.get(name, {}), where) for name, cls in SECTIONS.items()}
    cfg = RunConfig(**built, source=where)
    cfg.validate()
    return cfg


def resolve_batch(ds: dict, world_size: int) -> tuple[int, int, int, str]:
    """Check DeepSpeed's batch triple against the world size, filling in the one missing value.

    Returns (global batch, micro batch per rank, accumulation steps, a note naming what was derived).
    """
    g = ds.get("train_batch_size")
    m = ds.get("train_micro_batch_size_per_gpu")
    a = ds.get("gradient_accumulation_steps")
    for key, v in (("train_batch_size", g), ("train_micro_batch_size_per_gpu", m),
                   ("gradient_accumulation_steps", a)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"deepspeed.{key}: expected a positive int, got {v!r}")
    if g is None and m is None:
        raise ConfigError("deepspeed: set train_batch_size or train_micro_batch_size_per_gpu")
    note = ""
    if g is not None and m is not None and a is None:
        if g % (m * world_size):
            raise ConfigError(f"deepspeed.train_batch_size={g} is not divisible by train_micro_batch_size_per_gpu={m}"
                              f" x world size {world_size}; change one of them")
        a, note = g // (m * world_size), "gradient_accumulation_steps"
    elif g is not None and m is None:
        a = a or 1
        if g % (a * world_size):
            raise ConfigError(f"deepspeed.train_batch_size={g} is not divisible by gradient_accumulation_steps={a}"
                              f" x world size {world_size}; change one of them")
        m, note = g // (a * world_size), "train_micro_batch_size_per_gpu"
    elif g is None:
        a = a or 1
        g, note = m * a * world_size, "train_batch_size"
    elif g != m * a * world_size:
        raise ConfigError(f"deepspeed: train_batch_size={g} != train_micro_batch_size_per_gpu={m} x "
                          f"gradient_accumulation_steps={a} x world size {world_size}; drop one to derive it")
    return g, m, a, (f"derived {note} from the other two and world size {world_size}" if note else "")
