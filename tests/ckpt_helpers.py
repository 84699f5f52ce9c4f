"""Tiny checkpoints for the load/export/eval tests: a run config, a sentencepiece model, a corpus file,
and DeepSpeed checkpoints of several ZeRO stages (built in a subprocess, so this pytest process never
starts a process group)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128
WORDS = ["the", "model", "train", "token", "memory", "layer", "sub", "vector", "rank", "data", "loss",
         "small", "large", "read", "write", "north", "river", "city", "stone", "green", "light", "paper"]


def write_corpus(path: Path, n_docs=120, seed=0) -> Path:
    """A .jsonl file of C4-format documents."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T00:00:00Z", "url": f"https://x/{i}"}) + "\n")
    return path


def write_tokenizer(path: Path, seed: int = 1) -> Path:
    """A BPE sentencepiece model with unk/bos/eos = 0/1/2, small enough to train in a second."""
    import sentencepiece as spm
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")),
                                   vocab_size=VOCAB - 28, model_type="bpe", minloglevel=2)
    return path


def write_run_config(path: Path, tokenizer: Path, corpus: Path, output_dir: Path, **extra) -> Path:
    """A resolved run config for a model of a few thousand parameters (fp32, ZeRO 0)."""
    from training.config import load_config
    sets = [f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.max_sequence_length=32",
            "model.bos_token_id=1", "model.eos_token_id=2", f"data.tokenizer={tokenizer}", "data.source=local",
            f"data.path={corpus}", "data.seq_len=32", "data.val_tokens=1024", f"train.output_dir={output_dir}",
            "deepspeed.train_batch_size=4", "deepspeed.train_micro_batch_size_per_gpu=4"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    load_config(REPO / "configs" / "llama_tiny.json", sets).save(path)
    return path


def with_velora(model):
    """VeLoRA on v_proj and down_proj with v set by one training forward: checkpoints carry its
    buffers (`...codec.v`, `...codec.initialized`), exports must not."""
    from velora import VeLoRAConfig, apply_velora
    apply_velora(model, VeLoRAConfig(targets="paper", sub_token_size=8))
    model(torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9)))
    return model


def exported_run(d: Path) -> dict:
    """A tokenizer, corpus and run config in `d`, and a tiny model (with VeLoRA applied)
    exported to `d/run/final`."""
    from model import LlamaForCausalLM
    from training.config import load_config
    from training.hf import save_final
    tok = write_tokenizer(d / "sp.model")
    corpus = write_corpus(d / "docs.jsonl")
    rc_file = write_run_config(d / "run_config.json", tok, corpus, d / "run")
    rc = load_config(rc_file)
    torch.manual_seed(0)
    model = with_velora(LlamaForCausalLM(rc.model))
    final = save_final(model, rc, tok, d / "run" / "final")
    return {"dir": d, "tok": tok, "corpus": corpus, "rc_file": rc_file, "rc": rc, "model": model, "final": final}


def deepspeed_checkpoints(run_config: Path, tokenizer: Path, root: Path, stages=(0, 2, 3)) -> dict:
    """For each ZeRO stage, `root/zero{stage}/` laid out as a run directory: config.json,
    checkpoints/step_1/ (+ run_config.json, tokenizer.model), checkpoints/latest, and ref.pt (the
    trained weights, gathered). Returns {stage: run dir}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    code = f"from ckpt_helpers import _make_ds; _make_ds({str(run_config)!r}, {str(tokenizer)!r}, {str(root)!r}, {list(stages)!r})"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {s: root / f"zero{s}" for s in stages}


def _make_ds(run_config, tokenizer, root, stages):
    import shutil

    from training.distributed import free_port
    port = free_port()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from model import LlamaForCausalLM
    from training.config import load_config
    cfg = load_config(run_config)
    for stage in stages:
        run = Path(root) / f"zero{stage}"
        torch.manual_seed(stage)
        model = with_velora(LlamaForCausalLM(cfg.model))
        ds = {"train_batch_size": 2, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
              "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=ds)
        ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
        engine.backward(engine(ids, labels=ids))
        engine.step()
        engine.save_checkpoint(str(run / "checkpoints"), tag="step_1")
        cfg.save(run / "checkpoints" / "step_1" / "run_config.json")
        cfg.save(run / "config.json")      # the run directory's legacy name for its run config: still read
        shutil.copyfile(tokenizer, run / "checkpoints" / "step_1" / "tokenizer.model")
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, run / "ref.pt")


def flip_tensor_byte(pt_file: Path) -> None:
    """Flip one byte in the middle of the largest tensor record of a torch.save zip (stored uncompressed),
    leaving the archive's structure intact: only a content hash can tell."""
    import struct
    import zipfile
    with zipfile.ZipFile(pt_file) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(pt_file, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
