"""The correctness gate, run before any timing: a few steps of train_c4.py itself (its `main`, in this
process, through DeepSpeed) on a synthetic corpus, for each optimizer at ZeRO 0 and 2 and for each codec.

Per case three runs: bf16 for STEPS steps with a checkpoint at SAVE_AT; the same in fp32 (the reference,
shared by the ZeRO stages of one optimizer); and a resume of the bf16 run from its step-SAVE_AT
checkpoint. The case passes when every bf16 loss is finite and within LOSS_RTOL (by ZeRO stage) of the
fp32 one, and the resumed run reproduces the bf16 losses after SAVE_AT: the first one bitwise everywhere
(it depends only on the restored weights, data position and codec state, and the forward is
deterministic); the later ones bitwise on CPU, within RESUME_RTOL on CUDA, whose attention backward
accumulates with atomics.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from data.builtin import write_shard
from training.config import load_config
from training.state import RunDir

from .report import one_line

STEPS, SAVE_AT = 4, 2
# bf16 against fp32: max over steps of |difference| / fp32 loss, by ZeRO stage. DeepSpeed's ZeRO 0 bf16 path
# (DDP_BFLOAT16) keeps the gradients, and their accumulation over micro-batches, in bf16 (8 significant
# bits): measured on CPU up to 1.2e-2 after 4 steps; ZeRO 1-3 accumulate and reduce fp32 gradients: at
# ZeRO 2 within 1e-4 (docs/BENCHMARKS.md, "The GPU check"). The tolerances leave room for the GPU's
# other kernels (flash attention, cuBLAS's split reductions) and still catch a wrong gradient, which
# moves the loss by several percent in 4 steps of lr 3e-3 (the fp32 loss falls 7% over them).
LOSS_RTOL = {0: 3e-2, 1: 2e-3, 2: 2e-3, 3: 2e-3}
RESUME_RTOL = 1e-3
# The tiny model and batch of tests/conftest.py's TINY, on the synthetic corpus.
MODEL = ["model.hidden_size=64", "model.intermediate_size=172", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.vocab_size=512", "model.max_sequence_length=64"]
RUN = ["data.source=local", "data.seq_len=64", "data.val_tokens=1024", "data.shuffle_buffer=50",
       "deepspeed.train_batch_size=8", "deepspeed.train_micro_batch_size_per_gpu=4", "train.log_every=1",
       f"train.eval_every={STEPS}", f"train.save_every={SAVE_AT}", f"train.max_steps={STEPS}", "optim.lr=0.003",
       "optim.galore_rank=8", "optim.galore_update_proj_gap=2", "velora.sub_token_size=8"]
OPTIMIZERS = ("adamw", "adafactor", "galore_adamw")
STAGES = (0, 2)


@dataclass(frozen=True)
class GateCase:
    name: str
    sets: tuple                      # overrides of the bf16 run (and, but for the stage, of its reference)
    reference: str                   # cases with equal reference share one fp32 run
    stage: int = 0                   # the ZeRO stage (sets LOSS_RTOL)


def gate_cases(codecs, codec_variants: dict) -> list[GateCase]:
    """Each optimizer at each stage, then each codec (targets all, AdamW, ZeRO 0), variant by variant."""
    cases = [GateCase(f"{o} zero{s}", (f"optim.name={o}", f"deepspeed.zero_optimization.stage={s}"), o, s)
             for o in OPTIMIZERS for s in STAGES]
    for variant, sets in codec_variants.items():
        for codec in codecs:
            cases.append(GateCase(f"codec {codec} {variant}", ("velora.targets=all", f"velora.codec={codec}", *sets),
                                  f"{codec} {variant}"))
    return cases


def synthetic_corpus(root: Path, seed: int = 0, docs: int = 400) -> tuple[Path, Path]:
    """C4-format shards of made-up words following a fixed random Markov chain (learnable, so the loss
    falls), and a sentencepiece BPE model trained on them. Returns (shard directory, tokenizer file)."""
    import sentencepiece as spm

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(2, 7))) for _ in range(150)]
    follow = {w: rng.sample(words, 3) for w in words}
    texts = []
    for _ in range(docs):
        w, text = rng.choice(words), []
        for _ in range(rng.randint(20, 80)):
            text.append(w)
            w = rng.choice(follow[w])
        texts.append(" ".join(text))
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    n_val = docs // 10
    for i in range(2):
        write_shard(shards / f"c4-train.{i:05d}-of-00002.json.gz", [{"text": t} for t in texts[n_val + i::2]])
    write_shard(shards / "c4-validation.00000-of-00001.json.gz", [{"text": t} for t in texts[:n_val]])
    prefix = root / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[n_val:]), model_prefix=str(prefix), model_type="bpe",
                                   vocab_size=400, hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return shards, Path(f"{prefix}.model")


def losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} from a run's train_log.jsonl."""
    path = RunDir(run_dir).train_log
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def train(train_main, config: str, out: Path, sets: list[str], log: Path, resume: Path | None = None) -> dict:
    """`train_main` (train_c4.main) on `config` with `sets`, in this process, its output into `log`; the
    run's losses (RuntimeError when it exits non-zero: the last lines of its log)."""
    argv = ["--config", config, *[a for s in [*sets, f"train.output_dir={out}"] for a in ("--set", s)]]
    argv += ["--resume", str(resume)] if resume else []
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        rc = train_main(argv)
    if rc:
        tail = " / ".join(log.read_text().strip().splitlines()[-2:])
        raise RuntimeError(f"train_c4.py exited {rc}: {tail[-400:]}")
    return losses(out)


def compare(bf16: dict, fp32: dict, resumed: dict, exact_resume: bool, rtol: float) -> dict:
    """The gate's verdict on one case's losses (see the module docstring)."""
    steps = list(range(1, STEPS + 1))
    finite = sorted(bf16) == steps and all(math.isfinite(bf16[s]) for s in steps)
    rel = max((abs(bf16[s] - fp32[s]) / abs(fp32[s]) for s in steps if s in fp32 and s in bf16), default=math.inf)
    after = steps[SAVE_AT:]
    res = [abs(resumed.get(s, math.inf) - bf16.get(s, math.nan)) for s in after]
    res_rel = max((d / abs(bf16[s]) for d, s in zip(res, after) if s in bf16), default=math.inf)
    bitwise = all(resumed.get(s) == bf16.get(s) for s in after)
    resume_ok = (resumed.get(after[0]) == bf16.get(after[0])
                 and (bitwise if exact_resume else res_rel <= RESUME_RTOL))
    return {"finite": finite, "max_rel_vs_fp32": rel, "rtol": rtol, "tracks_fp32": rel <= rtol,
            "resume_bitwise": bitwise, "resume_max_rel": res_rel, "resume_ok": resume_ok,
            "passed": finite and rel <= rtol and resume_ok,
            "bf16_losses": [bf16.get(s) for s in steps], "fp32_losses": [fp32.get(s) for s in steps]}


def rejected(sets, base: str) -> str | None:
    """Why load_config refuses these overrides (a variant's key this branch lacks), or None."""
    try:
        load_config(base, list(sets))
    except Exception as e:
        return one_line(e)
    return None


def run_gate(record: dict, budget, cases: list[GateCase], train_main, base_config: str, exact_resume: bool,
             save, log_dir: Path) -> None:
    """Run each case through `train_main` (train_c4.main) on `base_config` (configs/llama_tiny.json) and fill
    record["rows"] with its verdict (`save()` after each); cases that no longer fit in `budget` (judged by
    the case before, the first one paying for start-up) are skipped with a note. The output of a case that
    did not pass is kept as `log_dir/gate-<n>.log`."""
    with tempfile.TemporaryDirectory(prefix="gpu_gate_") as tmp:
        tmp = Path(tmp)
        shards, tok = synthetic_corpus(tmp / "data")
        common = [*MODEL, *RUN, f"data.path={shards}", f"data.tokenizer={tok}"]
        record.update(steps=STEPS, resume_from=SAVE_AT,
                      resume_rule="bitwise" if exact_resume else f"first bitwise, then rel <= {RESUME_RTOL}")
        references, last = {}, 0.0
        for i, case in enumerate(cases):
            row = {"case": case.name}
            record["rows"].append(row)
            why = rejected([*common, *case.sets], base_config)
            if why or budget.spent(1.5 * last):
                row.update(status="skipped", note=why or "section time budget spent")
                save()
                continue
            started = budget.left()
            d = tmp / f"case{i}"
            d.mkdir()
            log = d / "log.txt"
            run = lambda out, sets, resume=None: train(train_main, base_config, out, sets, log, resume)  # noqa: E731
            try:
                bf16_sets = [*common, *case.sets, "deepspeed.bf16.enabled=true"]
                bf16 = run(d / "bf16", bf16_sets)
                if case.reference not in references:
                    fp32_sets = [*common, *case.sets, "deepspeed.bf16.enabled=false",
                                 "deepspeed.zero_optimization.stage=0", f"train.save_every={STEPS}"]
                    references[case.reference] = run(d / "fp32", fp32_sets)
                resumed = run(d / "resumed", bf16_sets, resume=d / "bf16" / "checkpoints" / f"step_{SAVE_AT}")
                row.update(status="ok", **compare(bf16, references[case.reference], resumed, exact_resume,
                                                     LOSS_RTOL[case.stage]))
                if not row["passed"]:
                    row["status"] = "FAILED"
            except Exception as e:            # one broken case must not cost the others
                row.update(status="error", note=one_line(e))
                with open(log, "a") as f:
                    traceback.print_exc(file=f)
            if row["status"] != "ok":
                log_dir.mkdir(parents=True, exist_ok=True)
                row["log"] = f"gate-{i:02d}.log"
                shutil.copyfile(log, log_dir / row["log"])
            last = started - budget.left()
            save()
        record["passed"] = sum(r.get("passed", False) for r in record["rows"])
        record["failed"] = sum(r["status"] in ("FAILED", "error") for r in record["rows"])
