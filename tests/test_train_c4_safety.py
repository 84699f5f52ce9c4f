"""Operator mistakes through the real command line: refused before anything is written with one line
(exit 2, no traceback), or handled for real; nothing the command did not create is deleted or replaced;
no checkpoint file is unpickled before it is checked."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, assert_one_line_error, env, losses, train
from training.state import write_manifest

SMALL = ["deepspeed.train_batch_size=4", "deepspeed.train_micro_batch_size_per_gpu=4", "train.eval_every=2",
         "train.save_every=2", "train.log_every=1"]


def cli(out, *sets, args=(), check=False, steps=4):
    return train(out, *SMALL, *sets, args=args, steps=steps, check=check)


def script(name, *args):
    return subprocess.run([sys.executable, f"scripts/{name}", *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)


def one_line(p, prog, *fragments):
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4, final/)."""
    out = tmp_path_factory.mktemp("done") / "run"
    cli(out, check=True)
    return out


# --- refused before anything starts, quickly ---

def test_config_errors_come_within_5_seconds_before_torch_is_imported(tmp_path):
    t0 = time.monotonic()
    p = cli(tmp_path / "run", "train.bogus=1")
    assert time.monotonic() - t0 < 5.0
    assert_one_line_error(p, "unknown key(s) train.bogus")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, fragment", [
    (["deepspeed.zero_optimisation={\"stage\": 2}"], "zero_optimisation (did you mean zero_optimization?)"),
    (["deepspeed.zero_optimization.stage=two"], "DeepSpeedZeroConfig.stage"),
    (["deepspeed.zero_optimization=3"], "must be a mapping, not int"),
    (["deepspeed.fp16.enabled=true"], "fp16 without a GPU"),
])
def test_deepspeed_section_is_checked_by_deepspeed_before_a_process_group_starts(tmp_path, sets, fragment):
    out = tmp_path / "run"
    assert_one_line_error(cli(out, *sets), fragment)
    assert not out.exists()


# --- nothing lost, nothing mixed ---

def test_resume_path_of_another_run_into_a_run_directory_is_refused(finished, tmp_path):
    other = tmp_path / "other"
    cli(other, "train.save_every=1", steps=1, check=True)
    before = sorted(p.name for p in (other / "checkpoints").iterdir())
    p = cli(other, args=["--resume", str(finished / "checkpoints" / "step_2")])
    assert_one_line_error(p, f"--resume {finished / 'checkpoints' / 'step_2'} continues another run",
                          f"train.output_dir={other} already holds checkpoints")
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == before


def test_export_never_replaces_what_it_did_not_write(finished, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    one_line(script("export_hf.py", "--checkpoint", finished, "--out", mine), "export_hf.py",
             "is not an export written by this project")
    assert (mine / "thesis.tex").read_text() == "years of work"
    one_line(script("export_hf.py", "--checkpoint", finished, "--out", finished), "export_hf.py",
             "is not an export")                                   # a run directory
    assert (finished / "checkpoints" / "latest").is_file()
    out = tmp_path / "exp"
    assert script("export_hf.py", "--checkpoint", finished, "--out", out).returncode == 0
    one_line(script("export_hf.py", "--checkpoint", finished, "--out", out), "export_hf.py", "pass --overwrite")
    assert script("export_hf.py", "--checkpoint", finished, "--out", out, "--overwrite").returncode == 0


@pytest.mark.slow
def test_data_that_runs_out_ends_the_run_cleanly_and_resume_finishes_it(tmp_path):
    from ckpt_helpers import write_corpus
    corpus = ["data.source=local", f"data.path={write_corpus(tmp_path / 'docs.jsonl', n_docs=60)}", "data.epochs=1",
              "data.val_tokens=256", "train.save_every=1000"]
    out = tmp_path / "run"
    p = cli(out, *corpus, steps=10_000, check=True)
    assert "the training data ran out after step" in p.stdout and (out / "final" / "model.safetensors").is_file()
    last = max(losses(out))
    assert 2 < last < 100 and (out / "checkpoints" / "latest").read_text() == f"step_{last}"
    again = cli(out, *corpus, steps=10_000, args=["--resume", "auto"], check=True)
    assert f"at step {last}" in again.stdout and "final validation: ppl" in again.stdout


@pytest.mark.slow
def test_an_exception_during_evaluation_keeps_the_steps_before_it(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, training.run as r; n = [0]\n"
            "def boom(*a):\n    raise RuntimeError('evaluation blew up')\n"
            "r.evaluate = boom\nimport train_c4; sys.exit(train_c4.main(sys.argv[1:]))")
    sets = [*TINY, *SMALL, "train.max_steps=4", "train.save_every=100", f"train.output_dir={out}"]
    p = subprocess.run([sys.executable, "-c", code, "--config", "configs/llama_tiny.json",
                        *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "evaluation blew up" in p.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_2"        # saved before the error propagated


# --- resume: what a checkpoint fixes is refused, what changes nothing computed is allowed ---

@pytest.mark.parametrize("sets, fragment", [
    (["optim.name=adafactor"], "optim.name: checkpoint 'adamw', now 'adafactor'"),
    (["deepspeed.zero_optimization.stage=1"], "zero_optimization.stage: checkpoint 0, now 1"),
    (["data.seq_len=32"], "data.seq_len: checkpoint 64, now 32"),
])
def test_resume_with_a_setting_the_checkpoint_fixes_is_refused(finished, sets, fragment):
    p = cli(finished, *sets, args=["--resume", "auto"])
    assert_one_line_error(p, fragment, "resume with the settings it was written with")


def test_resume_with_another_tokenizer_file_of_the_same_size_is_refused(tmp_path):
    from ckpt_helpers import write_tokenizer
    tok = write_tokenizer(tmp_path / "tok.model")
    run = tmp_path / "run"
    cli(run, f"data.tokenizer={tok}", "train.save_every=1", steps=1, check=True)
    write_tokenizer(tok, seed=2)                        # the same path and size, other merges
    p = cli(run, f"data.tokenizer={tok}", steps=2, args=["--resume", "auto"])
    assert_one_line_error(p, "trained with another tokenizer", f"--set data.tokenizer={run}/checkpoints/step_1/")


@pytest.mark.slow
def test_resume_with_memory_options_changed_is_allowed(finished, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    p = cli(run, "model.loss_chunk_size=64", "model.recompute_swiglu=true", steps=6, args=["--resume", "auto"],
            check=True)
    assert "note: resuming with changed settings: model.loss_chunk_size, model.recompute_swiglu" in p.stdout


# --- nothing executed ---

class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_planted_pickle_is_refused_everywhere_and_nothing_runs(finished, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")
    marker = tmp_path / "pwned"
    f = run / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=False)
    state["innocent"] = Planted(marker)
    torch.save(state, f)
    write_manifest(f.parent)      # a deliberate plant comes with a matching manifest: the allow-list is the guard
    msg = "holds the global posix.system, which is not in the allow-list"
    assert_one_line_error(cli(run, steps=6, args=["--resume", "auto"]), msg)
    one_line(script("eval_ppl.py", "--checkpoint", run, "--data", "builtin"), "eval_ppl.py", msg)
    one_line(script("export_hf.py", "--checkpoint", run, "--out", tmp_path / "x"), "export_hf.py", msg)
    assert not marker.exists()
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    one_line(script("eval_ppl.py", "--checkpoint", run, "--data", "builtin"), "eval_ppl.py",
             "not the name of a checkpoint directory")


# --- the scripts' own bad input ---

def test_eval_ppl_bad_device_seq_len_and_document_files(finished, tmp_path):
    one_line(script("eval_ppl.py", "--checkpoint", finished, "--data", "builtin", "--device", "cuda"),
             "eval_ppl.py", "no CUDA device; use --device cpu")
    one_line(script("eval_ppl.py", "--checkpoint", finished, "--data", "builtin", "--seq-len", "65"),
             "eval_ppl.py", "longer than the model's max_sequence_length (64)")
    import gzip
    docs = tmp_path / "docs.jsonl.gz"
    with gzip.open(docs, "wt") as f:
        f.write("\n".join(json.dumps({"text": f"document {i} " + "the river city " * 40}) for i in range(60)) + "\n")
    r = script("eval_ppl.py", "--checkpoint", finished, "--data", docs, "--json")
    assert r.returncode == 0, r.stderr


def test_velora_memory_impossible_batch():
    one_line(script("velora_memory.py", "--config", "configs/llama_tiny.json", "--batch-size", "0"),
             "velora_memory.py", "--batch-size must be positive")


def test_waiting_on_a_stale_build_lock_names_the_file(tmp_path, monkeypatch, capsys):
    import threading

    from training.distributed import COMM_OP, _warn_if_waiting_on_build_lock
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory
    lock = os.path.join(_get_build_directory(COMM_OP, False), "lock")
    open(lock, "w").close()
    _warn_if_waiting_on_build_lock(threading.Event(), after_s=0.01)
    err = capsys.readouterr().err
    assert f"still waiting after 0 s for {lock}" in err and "if no other run is starting, delete it" in err
    # the lock of this process's own (slow, first) build: no warning
    _warn_if_waiting_on_build_lock(threading.Event(), after_s=0.01, stale=False)
    assert capsys.readouterr().err == ""


# --- requeued jobs, damaged state, a disk that fills between saves ---

def test_stop_at_below_one_is_refused(tmp_path):
    assert_one_line_error(cli(tmp_path / "run", args=["--stop-at", "0"]), "--stop-at 0: expected a step >= 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_stop_at_is_honoured_on_resume_too(tmp_path):
    out = tmp_path / "run"
    cli(out, steps=6, args=["--stop-at", "2"], check=True)
    p = cli(out, steps=6, args=["--stop-at", "2", "--resume", "auto"], check=True)   # the job, requeued
    assert f"--stop-at 2: the run is already at step 2 ({out / 'checkpoints' / 'step_2'}); nothing to train; " \
           f"continue with a later --stop-at or without it" in p.stdout
    assert sorted(losses(out)) == [1, 2] and not (out / "final").exists()
    p = cli(out, steps=6, args=["--stop-at", "4", "--resume", "auto"], check=True)
    assert sorted(losses(out)) == [1, 2, 3, 4] and "stopped after step 4 (--stop-at)" in p.stdout


@pytest.mark.slow
def test_a_state_file_missing_a_key_is_one_line_naming_the_file(finished, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    state = run / "checkpoints" / "step_4" / "trainer_state_rank0.json"
    saved = json.loads(state.read_text())
    del saved["tokens_seen"]
    state.write_text(json.dumps(saved))
    write_manifest(state.parent)     # a well-formed file of another writer, not a corrupt one (integrity.py's case)
    p = cli(run, steps=6, args=["--resume", "auto"])
    assert_one_line_error(p, f"{state} has no 'tokens_seen' entry: the checkpoint is damaged or was not written by "
                             f"this project; resume from an earlier one with --resume {run / 'checkpoints'}/step_N")


@pytest.mark.slow
def test_a_disk_that_fills_between_saves_names_the_file_and_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    code = ("import errno, sys, training.metrics as m\n"
            "real = m.Metrics.train_step\n"
            "class Full:\n"
            "    def __init__(self, name): self.name = name\n"
            "    def write(self, text): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    def close(self): pass\n"
            "def train_step(self, step, **kw):\n"
            "    if step == 3: self.log = Full(self.log.name)\n"
            "    return real(self, step, **kw)\n"
            "m.Metrics.train_step = train_step\n"
            "import train_c4; sys.exit(train_c4.main(sys.argv[1:]))")
    sets = [*TINY, *SMALL, "train.max_steps=4", f"train.output_dir={out}"]
    p = subprocess.run([sys.executable, "-c", code, "--config", "configs/llama_tiny.json",
                        *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert_one_line_error(p, f"{out / 'train_log.jsonl'}: No space left on device after step 3; the last checkpoint "
                             f"is {out / 'checkpoints' / 'step_2'}; free space or fix permissions, then resume with "
                             f"--resume auto")
