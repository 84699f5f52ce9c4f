"""scripts/eval_ppl.py and scripts/export_hf.py as users run them: the numbers equal the in-process
evaluation, the export loads in transformers, bad input ends in one line and exit code 2."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from ckpt_helpers import REPO, deepspeed_checkpoints, exported_run
from training.evaluate import evaluate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return exported_run(tmp_path_factory.mktemp("scripts"))


def script(name, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, f"scripts/{name}", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def eval_json(checkpoint, data, *args):
    r = script("eval_ppl.py", "--checkpoint", checkpoint, "--data", data, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def in_process(model, rc, corpus, batch_size, **data_changes):
    """What train_c4's evaluation computes for this model on this data."""
    from data import load_tokenizer, validation_batches
    cfg = dataclasses.replace(rc.data, source="local", path=str(corpus), **data_changes)
    tok = load_tokenizer(cfg, rc.model.vocab_size)
    return evaluate(model, validation_batches(cfg, tok, batch_size))


@pytest.mark.slow
def test_eval_ppl_json_equals_in_process(setup):
    r = script("eval_ppl.py", "--checkpoint", setup["final"], "--data", setup["corpus"], "--batch-size", 3,
               "--max-tokens", 600, "--seq-len", 16, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = in_process(setup["model"], setup["rc"], setup["corpus"], 3, val_tokens=600, seq_len=16)
    for key in ("loss", "ppl", "galore_loss", "galore_ppl"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert (got["tokens"], got["batches"]) == (want["tokens"], want["batches"]) and got["tokens"] > 0
    assert got["config"]["format"] == "safetensors" and got["config"]["seq_len"] == 16


@pytest.mark.slow
def test_eval_ppl_second_slice_and_whole_file(setup):
    """--skip-tokens scores the slice after the first (data.val_skip_tokens); --split all every document of one
    file, as the in-process evaluation does."""
    got = eval_json(setup["final"], setup["corpus"], "--max-tokens", 200, "--skip-tokens", 200, "--batch-size", 4)
    first = eval_json(setup["final"], setup["corpus"], "--max-tokens", 200, "--batch-size", 4)
    want = in_process(setup["model"], setup["rc"], setup["corpus"], 4, val_tokens=200, val_skip_tokens=200)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6) and got["tokens"] == want["tokens"]
    assert got["loss"] != first["loss"] and got["config"]["skip_tokens"] == 200
    whole = eval_json(setup["final"], setup["corpus"], "--split", "all", "--max-tokens", 10 ** 6, "--batch-size", 4)
    from data import load_tokenizer, validation_batches
    cfg = dataclasses.replace(setup["rc"].data, source="local", path=str(setup["corpus"]), val_tokens=10 ** 6)
    want = evaluate(setup["model"], validation_batches(cfg, load_tokenizer(cfg, setup["rc"].model.vocab_size), 4,
                                                       split="all"))
    assert whole["loss"] == pytest.approx(want["loss"], rel=1e-6) and whole["tokens"] == want["tokens"]
    assert whole["tokens"] > 5 * (first["tokens"] + got["tokens"])      # every document, not the 1-in-10 split


@pytest.mark.slow
def test_eval_ppl_text_output(setup):
    r = script("eval_ppl.py", "--checkpoint", setup["final"].parent, "--data", setup["corpus"])
    assert r.returncode == 0, r.stderr
    for line in ("checkpoint:", "config:", "tokens evaluated:", "perplexity (token-weighted):",
                 "perplexity (GaLore-compatible"):
        assert line in r.stdout


@pytest.mark.slow
def test_deepspeed_checkpoint_eval_and_export(setup, tmp_path):
    """ZeRO 2 directory -> eval_ppl equals evaluating the trained weights; export_hf -> transformers."""
    run = deepspeed_checkpoints(setup["rc_file"], setup["tok"], tmp_path / "ds", stages=(2,))[2]
    model = type(setup["model"])(setup["rc"].model)
    ref = torch.load(run / "ref.pt", weights_only=True)
    model.load_state_dict({k: v for k, v in ref.items() if k in model.state_dict()})
    r = script("eval_ppl.py", "--checkpoint", run, "--data", setup["corpus"], "--json")
    assert r.returncode == 0, r.stderr
    assert "no final/ export" in r.stderr  # says it fell back to a DeepSpeed directory
    want = in_process(model, setup["rc"], setup["corpus"], 4)
    assert json.loads(r.stdout)["ppl"] == pytest.approx(want["ppl"], rel=1e-6)

    r = script("export_hf.py", "--checkpoint", run / "checkpoints" / "step_1", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_bad_input_one_line_exit_2(setup, tmp_path):
    cases = [("eval_ppl.py", ["--checkpoint", tmp_path, "--data", setup["corpus"]], "not a checkpoint"),
             ("eval_ppl.py", ["--checkpoint", setup["final"], "--data", tmp_path / "nope.jsonl"], "--data"),
             ("eval_ppl.py", ["--checkpoint", setup["final"], "--data", "builtin", "--batch-size", 0], "--batch-size"),
             ("export_hf.py", ["--checkpoint", tmp_path / "missing", "--out", tmp_path / "o"], "no such directory")]
    for name, args, fragment in cases:
        r = script(name, *args)
        assert r.returncode == 2 and r.stdout == "", (name, args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{name}: error:") and fragment in lines[0], r.stderr
    r = script("eval_ppl.py", "--checkpoint", tmp_path, "--data", "builtin", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_round_trip_train_zero2_two_processes(setup, tmp_path):
    """train_c4.py (ZeRO 2, two processes) -> the perplexity it printed, eval_ppl from the DeepSpeed
    directory, eval_ppl from final/ and load_model + evaluate here are one number."""
    from data import validation_batches
    from training.hf import load_model
    out = tmp_path / "run"
    sets = [f"train.output_dir={out}", "train.max_steps=4", "train.eval_every=4", "train.save_every=4",
            "deepspeed.zero_optimization.stage=2", "deepspeed.train_batch_size=4",
            "deepspeed.train_micro_batch_size_per_gpu=2", "velora.targets=paper", "velora.sub_token_size=8"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*torchrun, "train_c4.py", "--config", setup["rc_file"], *[a for s in sets for a in ("--set", s)]],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    in_training = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "eval"][-1]

    from_ds, from_final = (eval_json(path, setup["corpus"]) for path in (out / "checkpoints" / "step_4", out / "final"))
    model, rc, tok = load_model(out / "final")
    here = evaluate(model, validation_batches(rc.data, tok, 2))
    assert from_ds["config"]["format"] == "deepspeed" and from_final["config"]["format"] == "safetensors"
    for got in (from_ds, from_final, here):
        assert got["tokens"] == in_training["tokens"]
        assert got["ppl"] == pytest.approx(in_training["ppl"], rel=1e-5)
    # One process evaluates every batch itself, so GaLore's figure matches between the single-process views.
    assert from_ds["galore_ppl"] == pytest.approx(here["galore_ppl"], rel=1e-5)
    assert from_final["galore_ppl"] == pytest.approx(here["galore_ppl"], rel=1e-5)


@pytest.mark.slow
def test_eval_ppl_on_real_c4_shards(setup, c4_sample):
    """--data as a directory of C4 shards and as one .json.gz file: the same validation documents."""
    shard = c4_sample / "c4-validation.00000-of-00001.json.gz"
    by_dir, by_file = (eval_json(setup["final"], data, "--max-tokens", 500) for data in (c4_sample, shard))
    assert by_dir["config"]["source"] == "local" and by_dir["tokens"] > 0
    assert (by_dir["loss"], by_dir["tokens"]) == (by_file["loss"], by_file["tokens"])
