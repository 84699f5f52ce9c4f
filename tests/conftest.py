"""Shared test setup: offline, deterministic, the optional shared data located once, and the helpers
several test modules use (the train_c4.py runner, the synthetic corpus and tokenizer, gzip shards)."""
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data import DataConfig, TrainBatches
from data.builtin import write_shard
from training.distributed import free_port, spawn_local  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))   # the scripts are importable by the tests that check them
SHARED = REPO.parent / "shared"
C4_SAMPLE = SHARED / "c4-sample" / "en"
SP_32K = SHARED / "tokenizers" / "sp-bpe-32k.model"


@pytest.fixture
def c4_sample():
    """The real C4 sample shards, or skip when this machine has none (a fresh clone elsewhere)."""
    if not C4_SAMPLE.is_dir():
        pytest.skip("../shared/c4-sample not present")
    return C4_SAMPLE


@pytest.fixture
def sp_32k():
    if not SP_32K.is_file():
        pytest.skip("../shared/tokenizers/sp-bpe-32k.model not present")
    return SP_32K


# --- train_c4.py through its real command line (tests/test_train_*.py, test_errors_catalogue.py) ---
TINY = ["model.hidden_size=64", "model.intermediate_size=172", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.vocab_size=512", "model.max_sequence_length=64",
        "data.seq_len=64", "data.val_tokens=4096", "deepspeed.train_batch_size=8",
        "deepspeed.train_micro_batch_size_per_gpu=4", "train.log_every=1", "train.eval_every=10",
        "train.save_every=10", "train.keep_last=2", "optim.lr=0.003"]
STEPS = 30


def env():
    # One thread per process: the same arithmetic in every run (bitwise resume) and no
    # oversubscription of a small machine when two ranks run.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def train_cmd(out: Path, *sets: str, args=(), launcher=(), steps=STEPS) -> list[str]:
    """The train_c4.py command line of a tiny run (run it with cwd=REPO, env=env())."""
    overrides = [*TINY, f"train.max_steps={steps}", f"train.output_dir={out}", *sets]
    return [*(launcher or [sys.executable]), "train_c4.py", "--config", "configs/llama_tiny.json",
            *[a for s in overrides for a in ("--set", s)], *args]


def train(out: Path, *sets: str, args=(), launcher=(), steps=STEPS, check=True) -> subprocess.CompletedProcess:
    cmd = train_cmd(out, *sets, args=args, launcher=launcher, steps=steps)
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def assert_one_line_error(p: subprocess.CompletedProcess, *fragments: str) -> None:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if not line.startswith("[") or "error" in line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


# --- a synthetic corpus whose tokens name their document (tests/test_data_*.py) ---
EOS = 2


class NumTokenizer:
    """Word n -> token n; BOS/EOS 1/2, no pad (the builtin tokenizer's convention)."""
    vocab_size, bos_id, eos_id, pad_id, model_path = 10**7, 1, EOS, None, ""

    def encode_batch(self, texts):
        return [[int(w) for w in t.split()] for t in texts]


def doc_tokens(d, n):
    return [d * 1000 + 10 + j for j in range(n)]


def make_corpus(root, shard_sizes, val_docs=40, seed=0):
    """C4-format shards in `root`; returns {document tokens as a tuple} of the train split."""
    rng, d, train = random.Random(seed), 0, set()
    for i, size in enumerate(shard_sizes):
        docs = []
        for _ in range(size):
            toks = doc_tokens(d, rng.randint(1, 40))
            docs.append({"text": " ".join(map(str, toks))})
            train.add(tuple(toks))
            d += 1
        write_shard(root / f"c4-train.{i:05d}-of-{len(shard_sizes):05d}.json.gz", docs)
    val = [{"text": " ".join(map(str, doc_tokens(d + k, rng.randint(1, 40))))} for k in range(val_docs)]
    write_shard(root / "c4-validation.00000-of-00001.json.gz", val)
    return train


def cfg_for(root, **kw):
    return DataConfig(**{"source": "local", "path": str(root), "seq_len": 16, "shuffle_buffer": 5,
                         "val_tokens": 100, **kw})


def lines_shard(path, lines: list[bytes]):
    with gzip.open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def good(n, start=0):
    return [json.dumps({"text": f"{10 + i} {11 + i}"}).encode() for i in range(start, start + n)]


def read_all(path, **kw):
    tb = TrainBatches(cfg_for(path, epochs=1, **kw), NumTokenizer(), batch_size=4)
    return list(tb), tb.stats


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process ZeRO 0 run of the tiny config that launcher and parity tests compare with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    p = train(out, "data.num_workers=2")
    return out, p
