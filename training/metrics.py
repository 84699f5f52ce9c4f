"""What a run reports: TensorBoard scalars, `train_log.jsonl`, a tqdm bar and a summary line.

Only rank 0 writes. On resume, records past the restored step (written by the interrupted run after
its last checkpoint) are dropped from `train_log.jsonl` and TensorBoard, so both read as one run.
"""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data.sources import SKIPPED

from .collectives import all_reduce_values
from .state import RunDir, atomic_write_text

# Dense peak TFLOP/s per GPU by device-name substring (first match wins): (bf16, tf32).
PEAK_TFLOPS = [("H200", 989.0, 494.7), ("H100 PCIe", 756.0, 378.0), ("H100", 989.0, 494.7),
               ("A100", 312.0, 156.0), ("L40S", 362.0, 183.0), ("A6000", 154.8, 77.4), ("L4", 121.0, 60.0),
               ("A10", 125.0, 62.5)]


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Model training FLOPs per token at sequence length `seq_len` (PaLM's appendix B): 6 x the matmul
    parameters (attention and MLP projections and the LM head; not the embedding lookup) plus
    12 x layers x hidden x seq_len for the attention scores and their mixing (the causal mask ignored).
    Model FLOPs, not hardware FLOPs: recomputation and VeLoRA's cheaper weight gradients are not counted.
    Equal to torch.utils.flop_counter's count of one forward + backward (tests/test_training_metrics.py)."""
    c = model_cfg
    d, layers = c.hidden_size, c.num_hidden_layers
    matmul = layers * (4 * d * d + 3 * d * c.intermediate_size) + d * c.vocab_size
    return 6.0 * matmul + 12.0 * layers * d * seq_len


def peak_flops(device: torch.device, bf16: bool) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, label) for MFU; (None, reason) when not known."""
    if device.type != "cuda":
        return None, "MFU: not reported on CPU"
    name = torch.cuda.get_device_name(device)
    for key, p16, p32 in PEAK_TFLOPS:
        if key in name:
            peak, kind = (p16, "bf16") if bf16 else (p32, "tf32")
            return peak * 1e12, f"MFU against {name}'s dense {kind} peak of {peak:g} TFLOP/s"
    return None, f"MFU: peak FLOP/s of {name} unknown, not reported"


def peak_memory(device: torch.device) -> dict:
    """Peak memory so far, the maximum over ranks (every rank must call it): CUDA allocated/reserved on GPU,
    process peak RSS on CPU (bytes)."""
    if device.type == "cuda":
        mine = {"mem/cuda_max_allocated": torch.cuda.max_memory_allocated(device),
                "mem/cuda_max_reserved": torch.cuda.max_memory_reserved(device)}
    else:
        mine = {"mem/peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return dict(zip(mine, (int(v) for v in all_reduce_values(list(mine.values()), op="max"))))


def data_counts(stats: dict) -> dict:
    """The data iterator's document and skip counts, summed over ranks (every rank must call it)."""
    keys = ("docs",) + SKIPPED
    return dict(zip(keys, (int(v) for v in all_reduce_values([float(stats.get(k, 0)) for k in keys]))))


def describe_skips(counts: dict) -> str:
    """One line: documents read and what was skipped (the skip-and-count policy of data/)."""
    skipped = ", ".join(f"{counts[k]} {k}" for k in SKIPPED if counts.get(k))
    return f"data: {counts['docs']} documents read; skipped: {skipped or 'nothing'}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return math.inf


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the records of `path` (a train_log.jsonl) past `last_step`, and a last line cut short by a
    kill: what a resumed run does before it appends, so the log reads as one run."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(errors="replace").splitlines() if _step_of(line) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


class Metrics:
    """Per-step and per-evaluation reporting for rank 0 (a no-op on other ranks)."""

    def __init__(self, run_dir: Path, *, is_main: bool, max_steps: int, start_step: int, log_every: int,
                 device: torch.device, flops_per_token: float, peak: float | None, world_size: int):
        self.is_main, self.log_every, self.device = is_main, log_every, device
        self.max_steps, self.flops_per_token, self.peak, self.world = max_steps, flops_per_token, peak, world_size
        self.bar = self.tb = self.log = None
        if not is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        paths = RunDir(Path(run_dir))
        truncate_log(paths.train_log, start_step)
        self.log = open(paths.train_log, "a")
        self.tb = SummaryWriter(str(paths.tensorboard), purge_step=start_step + 1)
        # A bar only on a terminal: in a file (nohup, SLURM) its redraws are noise; the logged lines remain.
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                        mininterval=1.0, dynamic_ncols=True, disable=not sys.stderr.isatty())

    def run_config(self, config: dict) -> None:
        """The resolved run config as TensorBoard text, so a run can be identified from its events alone."""
        if self.is_main:
            self.tb.add_text("run_config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def print(self, msg: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(msg)
            sys.stdout.flush()

    def _record(self, record: dict) -> None:
        try:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        except OSError as e:       # a write() error names no file: name it for the run's one-line message
            raise OSError(e.errno, e.strerror, self.log.name) from e

    def train_step(self, step: int, *, loss: float, lr: float, grad_norm: float | None, tokens_seen: int,
                   step_tokens: int, step_positions: int, step_time: float, velora_bytes: int | None = None) -> None:
        """Report optimizer step `step`. Every rank calls it: at log steps the peak memory reported is the
        maximum over ranks (one collective). `step_tokens`: predicted tokens (tokens/s), `step_positions`:
        processed non-padding positions (MFU), both over all ranks; `velora_bytes`: VeLoRA coefficients kept
        by the last micro-batch."""
        logged = step % self.log_every == 0 or step == self.max_steps
        mem = peak_memory(self.device) if logged else {}
        if not self.is_main:
            return
        tok_s = step_tokens / max(step_time, 1e-9)
        scalars = {"train/loss": loss, "train/ppl": math.exp(min(loss, 700.0)), "train/lr": lr,
                   "train/tokens_seen": tokens_seen, "perf/tokens_per_s": tok_s, "perf/step_time_s": step_time, **mem}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        if velora_bytes is not None:
            scalars["mem/velora_stored_bytes"] = velora_bytes
        if self.peak:
            flops = step_positions * self.flops_per_token
            scalars["perf/mfu"] = flops / (max(step_time, 1e-9) * self.peak * self.world)
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if logged:
            self._record({"kind": "train", "step": step, **{k.split("/", 1)[1]: v for k, v in scalars.items()}})
            mem = " | ".join(f"{k.split('/', 1)[1]} {_gib(v)}" for k, v in mem.items())
            self.print(f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm "
                       f"{'-' if grad_norm is None else f'{grad_norm:.3f}'} | {_count(tok_s)} tok/s | "
                       f"{step_time:.2f} s/step | {mem} | tokens {_count(tokens_seen)}"
                       + (f" | MFU {scalars['perf/mfu']:.1%}" if self.peak else ""))

    def evaluation(self, step: int, result: dict) -> None:
        if not self.is_main:
            return
        for k in ("loss", "ppl", "galore_ppl"):
            self.tb.add_scalar(f"eval/{k}", result[k], step)
        self._record({"kind": "eval", "step": step, **result})
        self.print(f"eval at step {step}: loss {result['loss']:.4f} | ppl {result['ppl']:.2f} (token-weighted) | "
                   f"galore_ppl {result['galore_ppl']:.2f} (GaLore's batches+1 figure) | {result['tokens']} tokens")

    def data(self, step: int, counts: dict) -> None:
        """Documents read and lines/documents skipped so far (from `data_counts`), to TensorBoard."""
        if self.is_main:
            for k, v in counts.items():
                self.tb.add_scalar(f"data/{k}", v, step)

    def close(self) -> None:
        if self.is_main:
            self.bar.close()
            self.tb.close()
            self.log.close()
