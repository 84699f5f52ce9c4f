"""What the GPU check compares: methods as run-config overrides, the codec variants (eager and fused codecs),
and the run config of one method at one micro-batch on DeepSpeed's bf16 path."""
from __future__ import annotations

from dataclasses import dataclass

from training.config import RunConfig, load_config, resolve_batch

from .report import one_line

# Each variant's overrides, in the order they run (the default path first); a variant whose key this code
# base's config does not know is skipped, named.
CODEC_VARIANTS = {"fused": ("velora.fused=true",), "eager": ("velora.fused=false",)}


def uses_codecs(sets) -> bool:
    """Whether a method's overrides compress anything (only then do codec variants differ)."""
    return any(s.startswith("velora.") and not s.endswith("=none") for s in sets)


def codec_variants(config: str, variants: dict = CODEC_VARIANTS) -> tuple[dict, list[str]]:
    """The variants `config` accepts, and one note per refused one. When it refuses them all (a code base
    without the key), one variant `default`: the codecs as the code runs them by default."""
    ok, notes = {}, []
    for name, sets in variants.items():
        try:
            load_config(config, ["velora.targets=all", *sets])
            ok[name] = tuple(sets)
        except Exception as e:
            notes.append(f"codec variant {name} skipped ({' '.join(sets)}): {one_line(e)}")
    return (ok or {"default": ()}), notes


def method_variants(methods: dict, variants: dict) -> list[tuple[str, str, tuple]]:
    """(method, variant, overrides) for every method, in each codec variant where it compresses anything;
    variant by variant, so that a budget cut short leaves every method measured in the first one."""
    out = [(m, "", tuple(sets)) for m, sets in methods.items() if not uses_codecs(sets)]
    for variant, vsets in variants.items():
        out += [(m, variant, (*sets, *vsets)) for m, sets in methods.items() if uses_codecs(sets)]
    return out


def bench_config(config: str, sets, micro_batch: int, extra=()) -> RunConfig:
    """`config` with `extra` then `sets`, in bf16 (DeepSpeed's: bf16 weights, fp32 master), one process,
    `micro_batch` sequences per step and no gradient accumulation."""
    cfg = load_config(config, [*extra, *sets, "deepspeed.bf16.enabled=true",
                               f"deepspeed.train_batch_size={micro_batch}",
                               f"deepspeed.train_micro_batch_size_per_gpu={micro_batch}"])
    cfg.deepspeed.pop("gradient_accumulation_steps", None)
    g, m, a, _ = resolve_batch(cfg.deepspeed, 1)
    cfg.deepspeed.update(train_batch_size=g, train_micro_batch_size_per_gpu=m, gradient_accumulation_steps=a)
    return cfg


@dataclass(frozen=True)
class Size:
    """A model size the check runs: a run config, overrides that shrink it (smoke) and a micro-batch."""
    name: str
    config: str
    micro_batch: int
    extra: tuple = ()

    def run_config(self, sets=(), micro_batch: int | None = None) -> RunConfig:
        return bench_config(self.config, sets, micro_batch or self.micro_batch, self.extra)


def planned_peak(run_config: RunConfig, micro_batch: int) -> int | None:
    """The memory planner's prediction of `torch.cuda.max_memory_allocated` for one training step of
    `run_config` (the method's overrides already applied) at `micro_batch` on one GPU; None where the planner
    does not model the setting (ZeRO 3)."""
    from training.plan import plan_memory       # the planner's fake-tensor stack, only when asked
    stage = int(run_config.deepspeed.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        return None
    plan = plan_memory(run_config, "full_rank", micro_batch, stage, 1, "bf16" if run_config.bf16 else "fp32")
    return plan["cuda"]["max_memory_allocated"]
