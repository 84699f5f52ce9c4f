"""Data pipeline throughput against what training consumes (docs/BENCHMARKS.md, "Data pipeline throughput").

    python scripts/bench_data.py [--batches 100] [--workers 0 1 2] [--train-reps 3]
    python scripts/bench_data.py --per-core [--mfu 0.4] [--gpu H100]      (one thread; the GPU's need)

Pipeline: token positions per second delivered by `data.TrainBatches` (reading shards, parsing,
tokenization, packing, batching; start-up included, over --batches batches spanning several chunks)
with `num_workers` 0 (in-process), 1 and 2, for each config's data setup. llama_60m's own setup (C4 from the Hub, t5-base)
needs the network, so it is measured on the real C4 sample shards with the 32k sentencepiece model
and GaLore packing when ../shared has them. Training: positions per second of one fp32
forward + backward + AdamW step of the config's model on this machine's CPU (micro-batch capped by
--train-batch), median of --train-reps steps after one warm-up. Prints a Markdown table.

`--per-core`: the pipeline in-process on one thread, as positions per second of this process's CPU time
(robust to other load on the machine; what one DataLoader worker delivers on a core of its own), against
what the config's model consumes on one GPU at an assumed MFU: positions/s = MFU x the GPU's dense peak
(training/metrics.py) / model FLOPs per position (training.metrics.flops_per_token: 6 x matmul parameters
+ the attention term). An estimate from the datasheet peak, not a GPU measurement; workers needed =
ceil(consumption / per-core rate).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import TrainBatches, load_tokenizer  # noqa: E402
from model import LlamaForCausalLM  # noqa: E402
from training.config import load_config, resolve_batch  # noqa: E402
from training.metrics import PEAK_TFLOPS, flops_per_token  # noqa: E402

SHARED = REPO.parent / "shared"


def data_setup(cfg):
    """The config's data section, with offline stand-ins for the Hub (or None when there are none)."""
    data = cfg.data
    if data.source == "c4" or data.tokenizer == "t5-base":
        sample, sp = SHARED / "c4-sample" / "en", SHARED / "tokenizers" / "sp-bpe-32k.model"
        if not (sample.is_dir() and sp.is_file()):
            return None, "no ../shared c4-sample / tokenizer"
        data = dataclasses.replace(data, source="local", path=str(sample), tokenizer=str(sp))
        return data, f"C4 sample + sp-bpe-32k, {data.packing}"
    return data, f"{data.source} + {data.tokenizer} tokenizer, {data.packing}"


def pipeline_rate(data, tokenizer, batch_size: int, workers: int, batches: int) -> tuple[float, int]:
    """Positions per second over `batches` batches, start-up included; and the epochs it spanned."""
    start = time.perf_counter()
    it = TrainBatches(dataclasses.replace(data, num_workers=workers), tokenizer, batch_size)
    positions = sum(next(it)[0].numel() for _ in range(batches))
    return positions / (time.perf_counter() - start), it.stats["epoch"]


def setups(args):
    """(name, run config, data section, label, micro-batch) of each of `args.configs`; prints a row for one
    skipped."""
    for path in args.configs:
        cfg = load_config(REPO / path)
        data, label = data_setup(cfg)
        if data is None:
            print(f"| {Path(path).stem} | skipped: {label} | | | | | |")
            continue
        yield Path(path).stem, cfg, data, label, min(resolve_batch(cfg.deepspeed, 1)[1], args.train_batch)


def per_core_rate(data, tokenizer, batch_size: int, chunks: int) -> tuple[float, float]:
    """(positions per CPU second, positions per wall second) of the in-process pipeline from just after its
    first chunk was packed to just after its (chunks + 1)-th was: `chunks` chunks' reading, tokenization and
    packing, and about as many chunks' rows (a chunk is packed when its first row is asked for)."""
    it = TrainBatches(dataclasses.replace(data, num_workers=0), tokenizer, batch_size)
    next(it)
    cpu, wall, positions, packed, docs = time.process_time(), time.perf_counter(), 0, 0, it.stats["docs"]
    while packed < chunks:
        positions += next(it)[0].numel()
        if it.stats["docs"] != docs:
            packed, docs = packed + 1, it.stats["docs"]
    return positions / (time.process_time() - cpu), positions / (time.perf_counter() - wall)


def gpu_consumption(cfg, gpu: str, mfu: float) -> float:
    """Positions per second the config's model trains at on one `gpu` at `mfu` of its dense bf16 peak."""
    peak = next(p16 for key, p16, _ in PEAK_TFLOPS if key == gpu) * 1e12
    return mfu * peak / flops_per_token(cfg.model, cfg.data.seq_len)


def per_core_table(args) -> None:
    torch.set_num_threads(1)
    print(f"one thread, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; positions = "
          f"batch x seq_len; {args.gpu} consumption at MFU {args.mfu:.0%} of its dense bf16 peak (an estimate)\n")
    print(f"| config | data | pipeline positions per CPU-second | per wall-second | model FLOPs per position | "
          f"{args.gpu} consumption, positions/s | workers needed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, cfg, data, label, micro in setups(args):
        cpu_rate, wall_rate = per_core_rate(data, load_tokenizer(data, cfg.model.vocab_size), micro, args.chunks)
        need = gpu_consumption(cfg, args.gpu, args.mfu)
        print(f"| {name} | {label}, seq {data.seq_len}, batch {micro} | {cpu_rate:,.0f} | {wall_rate:,.0f} | "
              f"{flops_per_token(cfg.model, cfg.data.seq_len) / 1e6:,.1f}M | {need:,.0f} | "
              f"{math.ceil(need / cpu_rate)} |", flush=True)


def training_rate(cfg, batch_size: int, reps: int) -> float:
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.model.vocab_size, (batch_size, cfg.data.seq_len))
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        model(ids, labels=ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["configs/llama_tiny.json", "configs/llama_60m.json"])
    p.add_argument("--batches", type=int, default=500, help="timed pipeline batches per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-batch", type=int, default=8, help="cap on the micro-batch for the training timing")
    p.add_argument("--train-reps", type=int, default=3)
    p.add_argument("--per-core", action="store_true", help="one-thread pipeline rate against one GPU's consumption")
    p.add_argument("--mfu", type=float, default=0.4, help="with --per-core: the assumed model FLOPs utilisation")
    p.add_argument("--chunks", type=int, default=4,
                   help="with --per-core: chunks (data.shuffle_buffer documents each) timed")
    p.add_argument("--gpu", default="H100", choices=[key for key, *_ in PEAK_TFLOPS])
    args = p.parse_args(argv)
    if args.per_core:
        per_core_table(args)
        return 0

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, torch threads "
          f"{torch.get_num_threads()}; positions/s = (batch x seq_len) per second\n")
    print("| config | data | pipeline workers | pipeline positions/s | epochs read | training positions/s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, cfg, data, label, micro in setups(args):
        train = training_rate(cfg, micro, args.train_reps)
        tokenizer = load_tokenizer(data, cfg.model.vocab_size)
        for workers in args.workers:
            rate, epochs = pipeline_rate(data, tokenizer, micro, workers, args.batches)
            print(f"| {name} | {label}, seq {data.seq_len}, batch {micro} | {workers} | {rate:,.0f} | "
                  f"{epochs} | {train:,.0f} | {rate / train:,.0f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
