"""What the checkpoint manifest (training/state/integrity.py) costs per save and per load, for docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/bench_integrity.py --config configs/llama_60m.json --repeats 3

Writes a ZeRO-0 style `mp_rank_00_model_states.pt` of the config's model with AdamW state (fp32 weights and
both moments: what a llama_60m checkpoint holds) into a temporary directory, then times, interleaved over
--repeats rounds on one thread: torch.save of it (with fsync), `write_manifest` (hashing every file: the
cost added to a save), `verify` (the cost added to a load, file in the page cache) and torch.load of it;
and, for the choice of hash, CRC-32 beside BLAKE2b and SHA-256 over the same bytes. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from training.config import load_config  # noqa: E402
from training.state import verify, write_manifest  # noqa: E402


def checkpoint_state(model_cfg: LlamaConfig) -> dict:
    """The model's weights and AdamW's two moments per weight, as a ZeRO-0 model-states file holds them."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_cfg)
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w)}
             for i, w in enumerate(weights.values())}
    return {"module": weights, "optimizer": {"state": state, "param_groups": [{"params": list(state)}]}}


def digest_file(path: Path, make) -> None:
    h = make()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    h.digest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/llama_60m.json")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    state = checkpoint_state(cfg.model)
    n_params = sum(v.numel() for v in state["module"].values())
    timings: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        timings.setdefault(name, []).append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)
        f = d / "mp_rank_00_model_states.pt"

        def save():
            torch.save(state, f)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        for _ in range(args.repeats):
            timed("torch.save + fsync (the save itself)", save)
            timed("write_manifest (CRC-32 of every file: added to each save)", lambda: write_manifest(d))
            timed("verify (added to each load, file cached)", lambda: verify(d))
            timed("torch.load (the load itself)", lambda: torch.load(f, weights_only=False))
            timed("BLAKE2b-128 of the same file (for comparison)",
                  lambda: digest_file(f, lambda: hashlib.blake2b(digest_size=16)))
            timed("SHA-256 of the same file (for comparison)", lambda: digest_file(f, hashlib.sha256))
        size = f.stat().st_size
    print(f"{args.config}: {n_params / 1e6:.2f}M parameters, checkpoint file {size / 1e6:.0f} MB "
          f"(weights + AdamW moments, fp32), {args.repeats} interleaved rounds, 1 thread\n")
    print("| operation | median s | GB/s |\n|---|---|---|")
    for name, ts in timings.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {size / med / 1e9:.2f} |")


if __name__ == "__main__":
    main()
