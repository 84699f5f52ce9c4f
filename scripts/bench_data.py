"""Data pipeline throughput against what training consumes (docs/BENCHMARKS.md, "Data pipeline throughput").

    python scripts/bench_data.py [--batches 100] [--workers 0 1 2] [--train-reps 3]

Pipeline: token positions per second delivered by `data.TrainBatches` (reading shards, parsing,
tokenization, packing, batching; start-up included, over --batches batches spanning several chunks)
with `num_workers` 0 (in-process), 1 and 2, for each config's data setup. llama_60m's own setup (C4 from the Hub, t5-base)
needs the network, so it is measured on the real C4 sample shards with the 32k sentencepiece model
and GaLore packing when ../shared has them. Training: positions per second of one fp32
forward + backward + AdamW step of the config's model on this machine's CPU (micro-batch capped by
--train-batch), median of --train-reps steps after one warm-up. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    args = p.parse_args(argv)

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, torch threads "
          f"{torch.get_num_threads()}; positions/s = (batch x seq_len) per second\n")
    print("| config | data | pipeline workers | pipeline positions/s | epochs read | training positions/s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for path in args.configs:
        cfg = load_config(REPO / path)
        data, label = data_setup(cfg)
        if data is None:
            print(f"| {Path(path).stem} | skipped: {label} | | | | | |")
            continue
        micro = min(resolve_batch(cfg.deepspeed, 1)[1], args.train_batch)
        train = training_rate(cfg, micro, args.train_reps)
        tokenizer = load_tokenizer(data, cfg.model.vocab_size)
        for workers in args.workers:
            rate, epochs = pipeline_rate(data, tokenizer, micro, workers, args.batches)
            print(f"| {Path(path).stem} | {label}, seq {data.seq_len}, batch {micro} | {workers} | {rate:,.0f} | "
                  f"{epochs} | {train:,.0f} | {rate / train:,.0f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
