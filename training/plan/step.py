"""One simulated training step of our model, under FakeTensorMode (nothing allocated) or on real CPU
tensors, watched by the same MemoryTracker.

What runs is what train_c4.py runs at ZeRO 0 (zero.py says why): the model built and VeLoRA applied as
the config says (training/build.py), cast to bf16 when DeepSpeed trains in bf16, our optimizer
(training/optim/build.py) stepping fp32 masters of the bf16 weights the way DeepSpeed's FP16_UnfusedOptimizer
does, or the weights themselves in fp32. Two steps run, the first one short: zero gradients and an
optimizer step, which creates the optimizer's lazily made state (and GaLore's first SVD) at its full
size; then a full step (forward, backward, optimizer) with that state live throughout, as in every later
step of a run. Its forward also does the model's one-off work (VeLoRA's first basis). A first forward
and backward would only repeat the second's without the state, so they are skipped (it halves the
planner's time). Each phase's peak is kept with its parts.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..build import build_model
from ..optim import build_optimizer
from common.tensor_bytes import storages
from .tracker import MemoryTracker

PHASES = ("forward", "backward", "optimizer")


class _Parts:
    """The classify callback: which live storages are parameters, gradients, masters, optimizer state
    and tensors saved for backward (the rest are temporaries). Called at every new peak, so it keeps
    what it can: the weights' storages never change, the saved set is kept up to date by weak-reference
    callbacks, and the optimizer's state is walked again only in an optimizer phase (where it grows)."""

    def __init__(self, model, masters: dict, optimizer):
        self.model, self.masters, self.optimizer = model, masters, optimizer
        self.params = list(model.parameters())
        self._fixed = None
        self._saved_refs: dict[int, weakref.ref] = {}
        self._state, self._state_step = set(), None
        self.phase = ""

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ref = self._saved_refs.get(id(st))
        if ref is None or ref() is not st:         # a new storage may reuse a freed one's id
            self._saved_refs[id(st)] = weakref.ref(st, lambda r, k=id(st): self._unsave(k, r))
        return t

    def _unsave(self, key: int, ref: weakref.ref) -> None:
        if self._saved_refs.get(key) is ref:
            del self._saved_refs[key]

    def _state_storages(self) -> set:
        """storages(optimizer.state)'s ids, with a fast path for the usual {param: {name: tensor}}."""
        ids = set()
        for per_param in self.optimizer.state.values():
            if isinstance(per_param, dict) and all(isinstance(v, torch.Tensor) for v in per_param.values()):
                ids.update(id(v.untyped_storage()) for v in per_param.values())
            else:
                ids.update(storages(per_param))
        return ids

    def __call__(self) -> dict:
        if self._fixed is None:                  # weights and masters keep their storages for the whole run
            self._fixed = {"parameters": set(storages(list(self.model.parameters()) + list(self.model.buffers()))),
                           "master_weights": set(storages(list(self.masters.values())))}
        if self.phase.endswith("optimizer") or self._state_step != self.phase:
            self._state = self._state_storages()
            self._state_step = self.phase
        return {
            "parameters": self._fixed["parameters"],
            "gradients": {id(p.grad.untyped_storage()) for p in self.params if p.grad is not None},
            "master_weights": self._fixed["master_weights"],
            "master_gradients": {id(m.grad.untyped_storage()) for m in self.masters.values() if m.grad is not None},
            "optimizer_state": self._state,
            "saved_activations": set(self._saved_refs),
        }


def _to_bf16(model) -> None:
    """DeepSpeed's `module.bfloat16()` (floating parameters and buffers), without Module.to, which
    swaps fake tensors in place and refuses the ones FakeTensorMode holds weak references to."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                module._buffers[name] = b.to(torch.bfloat16)


def _masters(model, optimizer) -> dict:
    """DeepSpeed's FP16_UnfusedOptimizer set-up: an fp32 clone of each parameter replaces it in the
    optimizer's groups. Returns {parameter: master}."""
    masters = {}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            masters[p] = group["params"][i] = p.detach().clone().float()
    return masters


def _optimizer_step(model, optimizer, masters: dict) -> None:
    if masters:
        for p, m in masters.items():
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
    optimizer.step()
    for p, m in masters.items():
        m.grad = None
        p.data.copy_(m.data)
    for p in model.parameters():
        p.grad = None


def simulate(cfg, micro_batch: int, bf16: bool, fake: bool = True) -> dict:
    """Two training steps of `cfg`'s model (a ZeRO 0 RunConfig) on `micro_batch` sequences of data.seq_len
    tokens; the first one's forward and backward are skipped (see the module docstring). Returns
    {"phases": [{name, peak_bytes, peak_cuda_bytes, parts, cuda_parts, trace}], "saved_total": bytes the
    forward saved for backward, "n_params", "param_elsize"}; a trace is the tracker's (live bytes, live
    CUDA-rounded bytes, live storages, op) after each allocation of the phase."""
    if cfg.optim.name.startswith("galore") or cfg.optim.name == "adamw8bit":
        import bitsandbytes  # noqa: F401  (imported before tracking: an import makes module-level tensors)
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    tracker = MemoryTracker()
    with fake_mode, tracker, warnings.catch_warnings():
        # The codecs key their per-forward cache by data_ptr, which is 0 for every fake tensor; harmless
        # here (a codec's cache only ever sees its own input group's tensors).
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        torch.manual_seed(cfg.train.seed)
        model, _ = build_model(cfg)
        if bf16:
            _to_bf16(model)
        optimizer, _, _ = build_optimizer(model, cfg)
        masters = _masters(model, optimizer) if bf16 else {}
        ids = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.data.seq_len))
        parts = tracker.classify = _Parts(model, masters, optimizer)
        for t in list(model.parameters()) + list(model.buffers()) + list(masters.values()):
            tracker.add(t)
        model.train()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        _phase(tracker, parts, "step1 optimizer")
        _optimizer_step(model, optimizer, masters)
        _phase(tracker, parts, "step2 forward")
        with torch.autograd.graph.saved_tensors_hooks(parts.pack, lambda t: t):
            loss = model(ids, labels=ids)
        saved_total = tracker.parts()["saved_activations"][0]
        _phase(tracker, parts, "step2 backward")
        loss.backward()
        del loss
        _phase(tracker, parts, "step2 optimizer")
        _optimizer_step(model, optimizer, masters)
        n_params = sum(p.numel() for p in model.parameters())
    phases = []
    for name, rec in tracker.phases.items():
        parts = tracker.phase_parts(name)
        phases.append({"name": name, "peak_bytes": rec["peak_bytes"], "peak_cuda_bytes": rec["peak_cuda_bytes"],
                       "parts": {k: v[0] for k, v in parts.items()}, "cuda_parts": {k: v[1] for k, v in parts.items()},
                       "trace": rec["trace"]})
    return {"phases": phases, "saved_total": saved_total, "n_params": n_params, "param_elsize": 2 if bf16 else 4}


def _phase(tracker: MemoryTracker, parts: _Parts, name: str) -> None:
    parts.phase = name
    tracker.phase(name)
